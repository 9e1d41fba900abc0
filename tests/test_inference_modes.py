"""Deterministic eval, classic weight scaling, Monte Carlo dropout."""

import math

import pytest
import torch
from torch import nn

from rnndrop.config import RecurrentDropout as RD
from rnndrop.functional import keep_probability
from rnndrop.nn import GRU, LSTM, LockedDropout, mc_dropout

SCHEMES = [
    RD.naive(0.3),
    RD.variational(0.3),
    RD.zoneout(0.1, 0.3),
    RD.weight_drop(0.3),
    RD.semeniuta(0.3),
    RD.awd(),
    RD.variational(0.3, tied=False),
]
# the GRU has no cell state: its zoneout scheme is zoneout on h alone
GRU_SCHEMES = [c for c in SCHEMES if not c.zoneout_cell] + [RD.zoneout(0.1, 0.0)]
BY_CELL = [(LSTM, c) for c in SCHEMES] + [(GRU, c) for c in GRU_SCHEMES]
TORCH = {LSTM: nn.LSTM, GRU: nn.GRU}


def _ids(v):
    return v.__name__ if isinstance(v, type) else v.describe()


@pytest.mark.parametrize("cls,cfg", BY_CELL, ids=_ids)
def test_eval_is_deterministic(cls, cfg):
    lstm = cls(5, 7, 2, dropout=cfg).eval()
    x = torch.randn(6, 3, 5)
    assert torch.equal(lstm(x)[0], lstm(x)[0])


@pytest.mark.parametrize(
    "cls,cfg", [(k, c) for k, c in BY_CELL if not (c.zoneout_cell or c.zoneout_hidden)], ids=_ids
)
def test_inverted_eval_is_plain_lstm(cls, cfg):
    ref = TORCH[cls](5, 7, 2)
    lstm = cls(5, 7, 2, dropout=cfg).eval()
    lstm.load_state_dict(ref.state_dict())
    x = torch.randn(6, 3, 5)
    assert torch.equal(lstm(x)[0], ref(x)[0])


def test_zoneout_eval_uses_expectation_not_plain_lstm():
    ref = nn.LSTM(5, 7)
    lstm = LSTM(5, 7, dropout=RD.zoneout(0.3, 0.3)).eval()
    lstm.load_state_dict(ref.state_dict())
    x = torch.randn(6, 3, 5)
    assert not torch.allclose(lstm(x)[0], ref(x)[0])
    # first step from zero state: c_1 = (1 - z) c~_1 and h_1 = (1 - z) h~_1
    _, (h1, c1) = lstm(x[:1])
    _, (rh, rc) = ref(x[:1])
    torch.testing.assert_close(c1, 0.7 * rc)
    torch.testing.assert_close(h1, 0.7 * rh)


def test_gru_zoneout_eval_uses_expectation_not_plain_gru():
    ref = nn.GRU(5, 7)
    gru = GRU(5, 7, dropout=RD.zoneout(0.3, 0.0)).eval()
    gru.load_state_dict(ref.state_dict())
    x = torch.randn(6, 3, 5)
    assert not torch.allclose(gru(x)[0], ref(x)[0])
    # first step from zero state: h_1 = z·0 + (1 - z) h~_1
    _, h1 = gru(x[:1])
    _, rh = ref(x[:1])
    torch.testing.assert_close(h1, 0.7 * rh)
    # second step by hand: h_2 = z h_1 + (1 - z) GRU(x_2, h_1)
    _, h2 = gru(x[:2])
    _, rh2 = ref(x[1:2], h1)
    torch.testing.assert_close(h2, 0.3 * h1 + 0.7 * rh2)


@pytest.mark.parametrize("cls", [LSTM, GRU], ids=_ids)
def test_classic_scaling_output_and_input(cls):
    p = 0.4
    lstm = cls(5, 7, dropout=RD(input=p, output=p, scaling="classic")).eval()
    plain = cls(5, 7)
    plain.load_state_dict(lstm.state_dict())
    x = torch.randn(6, 3, 5)
    out, _, pre = lstm(x, return_pre_dropout=True)
    torch.testing.assert_close(pre, plain(x * (1 - p))[0])
    torch.testing.assert_close(out, pre * (1 - p))


@pytest.mark.parametrize("cls", [LSTM, GRU], ids=_ids)
def test_mc_mode_samples_and_restores(cls):
    model = nn.Sequential()
    lstm = cls(5, 7, dropout=RD.variational(0.3))
    model.add_module("lstm", lstm)
    model.eval()
    x = torch.randn(6, 3, 5)
    det = lstm(x)[0]
    with mc_dropout(model):
        assert lstm.mc and not lstm.training
        a, b = lstm(x)[0], lstm(x)[0]
        assert not torch.equal(a, b)
    assert not lstm.mc
    assert torch.equal(lstm(x)[0], det)


def test_mc_mean_of_linear_readout_converges_to_deterministic():
    """Output dropout feeding a linear layer: E[W(m ⊙ h) + b] = W h + b (inverted masks)."""
    p, N = 0.3, 3000
    lstm = LSTM(5, 16, dropout=RD(output=p)).eval()
    head = nn.Linear(16, 3)
    x = torch.randn(4, 2, 5)
    with torch.no_grad():
        det = head(lstm(x)[0]).double()
        with mc_dropout(lstm):
            h = lstm(x, return_pre_dropout=True)[2]
            samples = torch.stack([head(lstm(x)[0]) for _ in range(N)]).double()
    keep = keep_probability(p)
    # s.e. of the mean of W(m ⊙ h): sqrt(Σ_j W_kj² h_j² (1-keep)/keep / N)
    var = (head.weight.double() ** 2 @ (h.double() ** 2).unsqueeze(-1)).squeeze(-1)
    se = (var * (1 - keep) / keep / N).sqrt()
    assert ((samples.mean(0) - det).abs() <= 5 * se + 1e-9).all()
    assert samples.std(0).min() > 0  # it really samples


def test_mc_mode_reaches_standalone_modules():
    drop = LockedDropout(0.5)
    seq = nn.Sequential(drop).eval()
    x = torch.ones(4, 3, 10)
    assert torch.equal(seq(x), x)
    with mc_dropout(seq):
        y = seq(x)
    assert not torch.equal(y, x)
    assert set(y.unique().tolist()) <= {0.0, 1 / keep_probability(0.5)}


@pytest.mark.parametrize("cls", [LSTM, GRU], ids=_ids)
def test_geometric_mean_identity(cls):
    """Dropout on N units feeding one linear layer + softmax: the weight-scaled network equals
    the normalised geometric mean of all 2^N thinned networks' distributions (exact)."""
    N, p = 8, 0.3
    torch.manual_seed(5)
    for scaling in ("classic", "inverted"):
        lstm = cls(3, N, dropout=RD(output=p, scaling=scaling)).double().eval()
        head = nn.Linear(N, 5).double()
        x = torch.randn(4, 2, 3, dtype=torch.float64)
        with torch.no_grad():
            out, _, h = lstm(x, return_pre_dropout=True)
            scaled = head(out).softmax(-1)
            log_gm = torch.zeros_like(scaled)
            kept_value = 1.0 if scaling == "classic" else 1 / (1 - p)
            for bits in range(2**N):
                m = torch.tensor([(bits >> j) & 1 for j in range(N)], dtype=torch.float64)
                prob = math.prod(1 - p if b else p for b in m.tolist())
                log_gm += prob * head(h * m * kept_value).log_softmax(-1)
            gm = log_gm.softmax(-1)  # normalise the geometric mean
        torch.testing.assert_close(scaled, gm, atol=1e-12, rtol=1e-10)
