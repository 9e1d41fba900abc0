"""Concrete dropout on the recurrent sites (Gal, Hron & Kendall 2017).

What is held here:
- the config: ``concrete``/``temperature`` fields, on the presets, validation;
- the module: one ``dropout_logit_<site>`` parameter per site with a rate, initialised at the
  config's rates, none without ``concrete`` (state_dict keys stay ``torch.nn.LSTM``'s);
- the gradient of the relaxed masks with respect to the rate logits, through every path
  (fused beside the op, folded into ``W_hh``/``W_ih``, weight drop, and inside the time loop,
  where the loop backends' hand-written backward returns the masks' gradients), against
  finite differences (``torch.autograd.gradcheck``, float64, noise fixed by seeding torch's
  generator before each call);
- the ``cpp`` and ``triton`` (interpreter) backends against the ``python`` reference, on
  outputs and rate gradients;
- rates stay in (0, 1) whatever step an optimiser takes;
- eval: deterministic inference at the learned rates (identity for dropout, zoneout's
  expectation), Monte Carlo with hard masks at the learned rates;
- the regulariser's value against the paper's formula, written out by hand;
- a toy task where the input site carries only noise: its learned rate rises (towards the
  prior's 0.5), while the same site carrying the signal learns a low rate.
"""

import math

import pytest
import torch
from torch.func import functional_call

from rnndrop.config import CONCRETE_RATE_BOUNDS, RecurrentDropout
from rnndrop.functional import concrete_logit, concrete_logit_init, concrete_mask
from rnndrop.kernels import loop_backend
from rnndrop.kernels.cpp import build
from rnndrop.nn import GRU, LSTM, mc_dropout

RD = RecurrentDropout
CLS = {"lstm": LSTM, "gru": GRU}

# Every site, alone and together, under each mask policy and path (temperature 0.5: the
# relaxed masks are smoother, so central differences with eps 1e-6 resolve them well; the
# paper's 0.1 is checked on its own below).
CONFIGS = {
    "variational_tied": RD.variational(0.3, temperature=0.5, concrete=True),
    "variational_untied": RD.variational(0.3, tied=False, temperature=0.5, concrete=True),
    "per_step_untied": RD(
        input=0.3,
        recurrent=0.2,
        output=0.2,
        tied=False,
        time="per_step",
        concrete=True,
        temperature=0.5,
    ),
    "folded": RD(
        input=0.3, recurrent=0.3, batch="per_batch", tied=False, concrete=True, temperature=0.5
    ),
    "semeniuta": RD.semeniuta(0.3, concrete=True, temperature=0.5),
    "zoneout": RD.zoneout(0.2, 0.3, concrete=True, temperature=0.5),
    "weight_drop": RD(weight_hh=0.3, recurrent=0.2, concrete=True, temperature=0.5),
    "everything": RD(
        input=0.2,
        between_layers=0.2,
        recurrent=0.2,
        candidate=0.2,
        zoneout_hidden=0.1,
        zoneout_cell=0.2,
        output=0.2,
        concrete=True,
        temperature=0.5,
    ),
}


def _cfg(cell: str, cfg: RecurrentDropout) -> RecurrentDropout:
    return cfg.replace(zoneout_cell=0.0) if cell == "gru" else cfg


def _model(cell, cfg, dtype=torch.float64, **kw):
    torch.manual_seed(0)
    kw = {"num_layers": 2, "bidirectional": True, **kw}
    return CLS[cell](3, 4, dropout=_cfg(cell, cfg), **kw).to(dtype)


def _need_cpp():
    if build.disabled() or build.load() is None:
        pytest.skip("the compiled loop kernel is not available")


# ---- config ---------------------------------------------------------------------------


def test_config_fields_and_presets():
    cfg = RD.variational(0.2, concrete=True)
    assert cfg.concrete and cfg.temperature == 0.1
    assert cfg.concrete_sites == ["input", "between_layers", "recurrent", "output"]
    assert "concrete t=0.1" in cfg.describe()
    assert RD.from_dict(cfg.to_dict()) == cfg
    for name in ("naive", "naive_recurrent", "variational", "zoneout", "weight_drop",
                 "semeniuta", "awd"):  # fmt: skip
        made = RD.preset(name, concrete=True, temperature=0.3)
        assert made.concrete and made.temperature == 0.3
    # the embedding site lives outside the layer: its rate stays fixed
    assert "embedding" not in RD.awd(concrete=True).concrete_sites
    assert not RD().concrete and RD().temperature == 0.1


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(input=0.3, concrete=True, scaling="classic"), "inverted"),
        (dict(input=0.9995, concrete=True), r"\(0.001, 0.999\)"),
        (dict(input=0.001, concrete=True), r"\(0.001, 0.999\)"),
        (dict(input=0.3, concrete=True, temperature=0.0), "temperature"),
        (dict(input=0.3, concrete=True, temperature=-1), "temperature"),
        (dict(input=0.3, concrete="yes"), "concrete"),
    ],
)
def test_config_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RD(**kwargs)


def test_config_warns_when_idle():
    with pytest.warns(UserWarning, match="concrete=True"):
        RD(concrete=True)
    with pytest.warns(UserWarning, match="temperature"):
        RD(input=0.2, temperature=0.5)


# ---- the module's parameters --------------------------------------------------------------


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_parameters_named_and_initialised(cell):
    cfg = _cfg(cell, RD(input=0.2, recurrent=0.35, zoneout_hidden=0.1, concrete=True))
    m = CLS[cell](3, 4, num_layers=2, dropout=cfg)
    names = [n for n, _ in m.named_parameters() if "logit" in n or "rate" in n]
    assert names == ["dropout_logit_input", "dropout_logit_recurrent",
                     "dropout_logit_zoneout_hidden"]  # fmt: skip
    assert set(m.concrete_parameters()) == {"input", "recurrent", "zoneout_hidden"}
    rates = m.concrete_rates()
    for site, rate in rates.items():
        assert isinstance(rate, float) and rate == pytest.approx(getattr(cfg, site), abs=1e-6)
    # reset_parameters puts the rates back to the config's
    with torch.no_grad():
        m.dropout_logit_recurrent.fill_(3.0)
    m.reset_parameters()
    assert m.concrete_rates()["recurrent"] == pytest.approx(0.35, abs=1e-6)


def test_without_concrete_nothing_changes():
    torch.manual_seed(0)
    ours = LSTM(3, 4, num_layers=2, dropout=RD.variational(0.3))
    torch.manual_seed(0)
    ref = torch.nn.LSTM(3, 4, num_layers=2)
    assert list(ours.state_dict()) == list(ref.state_dict())
    for a, b in zip(ours.parameters(), ref.parameters(), strict=True):
        assert torch.equal(a, b)  # same initialisation, same RNG draws
    assert ours.concrete_rates() == {} and ours.concrete_parameters() == {}
    assert float(ours.concrete_regularizer(100)) == 0.0


def test_concrete_initialisation_draws_like_torch():
    """The learned rates consume no random numbers: the weights are torch's."""
    torch.manual_seed(0)
    ours = LSTM(3, 4, dropout=RD.variational(0.3, concrete=True))
    torch.manual_seed(0)
    ref = torch.nn.LSTM(3, 4)
    for name, p in ref.named_parameters():
        assert torch.equal(getattr(ours, name), p)


# ---- the relaxed mask -------------------------------------------------------------------


def test_concrete_mask_formula_and_limits():
    logit = torch.tensor(math.log(0.3 / 0.7), dtype=torch.float64)
    torch.manual_seed(3)
    m = concrete_mask(logit, (5000,), 0.1)
    torch.manual_seed(3)
    u = torch.rand(5000, dtype=torch.float64).clamp(1e-7, 1 - 1e-7)
    z = torch.sigmoid((logit + u.log() - (1 - u).log()) / 0.1)
    torch.testing.assert_close(m, (1 - z) / 0.7)
    # values in (0, 1/(1-p)); at t = 0.1 almost all near 0 or 1/(1-p), ~30% dropped
    assert bool((m >= 0).all()) and bool((m <= 1 / 0.7 + 1e-12).all())
    dropped = (m < 0.5 / 0.7).double().mean().item()
    assert dropped == pytest.approx(0.3, abs=0.03)  # 5000 draws: sd 0.0065
    # zoneout's weight of the previous value is z itself, unscaled
    torch.manual_seed(3)
    torch.testing.assert_close(concrete_mask(logit, (5000,), 0.1, keep=False), z)


def test_bounded_logit():
    _, hi = CONCRETE_RATE_BOUNDS
    for p in (0.0011, 0.01, 0.2, 0.5, 0.9, 0.9989):
        theta = concrete_logit_init(p)
        assert float(torch.sigmoid(concrete_logit(torch.tensor(theta, dtype=torch.float64)))) \
            == pytest.approx(p, rel=1e-9)  # fmt: skip
    with pytest.raises(ValueError):
        concrete_logit_init(hi)


# ---- gradients against finite differences --------------------------------------------------


def _gradcheck(m, backend, T=5, B=2):
    x = torch.randn(T, B, 3, dtype=torch.float64)
    names = [f"dropout_logit_{s}" for s in m.concrete_parameters()]
    logits = tuple(getattr(m, n).detach().clone().requires_grad_() for n in names)

    def f(*ls):
        torch.manual_seed(1)  # the same uniform noise at every call
        with loop_backend(backend):
            out, state = functional_call(m, dict(zip(names, ls, strict=True)), (x,))
        return out, *state

    # float64, central differences with eps 1e-6: truncation error ~eps² · f''' is far
    # below atol 1e-5 for these O(1) outputs; rounding error ~1e-16/eps = 1e-10
    assert torch.autograd.gradcheck(f, logits, eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_gradcheck_python(cell, name):
    _gradcheck(_model(cell, CONFIGS[name]), "python")


@pytest.mark.parametrize("name", ["per_step_untied", "semeniuta", "zoneout", "everything"])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_gradcheck_cpp(cell, name):
    _need_cpp()
    _gradcheck(_model(cell, CONFIGS[name]), "cpp")


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_gradcheck_paper_temperature(cell):
    """t = 0.1: steeper masks (|dz/dlogit| up to 1/(4t) = 2.5), still resolved."""
    cfg = RD(input=0.2, recurrent=0.3, candidate=0.2, zoneout_hidden=0.2, concrete=True)
    _gradcheck(_model(cell, cfg, num_layers=1, bidirectional=False), "python", T=4)


def test_packed_sequence_zoneout_gradcheck():
    """Past each sequence's end the zoneout weight is 1 (state carried): no rate gradient."""
    m = _model("lstm", CONFIGS["zoneout"], num_layers=1, bidirectional=False)
    x = torch.randn(5, 3, 3, dtype=torch.float64)
    lengths = torch.tensor([5, 3, 2])
    names = ["dropout_logit_zoneout_hidden", "dropout_logit_zoneout_cell"]
    logits = tuple(getattr(m, n).detach().clone().requires_grad_() for n in names)

    def f(*ls):
        torch.manual_seed(1)
        packed = torch.nn.utils.rnn.pack_padded_sequence(x, lengths)
        with loop_backend("python"):
            out, (h, c) = functional_call(m, dict(zip(names, ls, strict=True)), (packed,))
        return out.data, h, c

    assert torch.autograd.gradcheck(f, logits, eps=1e-6, atol=1e-5, rtol=1e-4)


# ---- backends against the reference ---------------------------------------------------------


def _run(m, backend, x, weight):
    m.zero_grad()
    torch.manual_seed(1)
    with loop_backend(backend):
        out, state = m(x)
    (out * weight).sum().backward()
    grads = {s: p.grad.clone() for s, p in m.concrete_parameters().items()}
    return out.detach(), state[0].detach(), grads, m.weight_hh_l0.grad.clone()


def _parity(cell, name, backend, dtype, tol):
    torch.manual_seed(0)
    m = CLS[cell](3, 5, num_layers=2, bidirectional=True,
                  dropout=_cfg(cell, CONFIGS[name])).to(dtype)  # fmt: skip
    x = torch.randn(4, 3, 3, dtype=dtype)
    weight = torch.linspace(-1, 1, 4 * 3 * 10, dtype=dtype).view(4, 3, 10)
    ref = _run(m, "python", x, weight)
    got = _run(m, backend, x, weight)
    torch.testing.assert_close(got[0], ref[0], **tol)
    torch.testing.assert_close(got[1], ref[1], **tol)
    assert got[2].keys() == ref[2].keys()
    for site in ref[2]:
        torch.testing.assert_close(got[2][site], ref[2][site], **tol, msg=site)
    torch.testing.assert_close(got[3], ref[3], **tol)


@pytest.mark.parametrize("name", ["per_step_untied", "everything", "variational_untied"])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_cpp_matches_python(cell, name):
    """float64: the same math in another order; 1e-12 is ~10⁴ ulps of these O(1) values."""
    _need_cpp()
    _parity(cell, name, "cpp", torch.float64, dict(atol=1e-12, rtol=1e-10))


@pytest.mark.parametrize("path", ["loop", "step"])
@pytest.mark.parametrize("name", ["per_step_untied", "everything"])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_triton_matches_python(cell, name, path, monkeypatch):
    """float32 in Triton's interpreter, the tolerance of tests/test_triton.py (its tanh is
    written 2σ(2x) − 1, a few ulps from torch's); both of its paths (one launch, per step)."""
    pytest.importorskip("triton", reason="triton is not installed (the 'triton' extra)")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("RNNDROP_TRITON_PATH", path)
    _parity(cell, name, "triton", torch.float32, dict(atol=1e-5, rtol=1e-5))


def test_backends_without_mask_gradients_unchanged():
    """No mask asks for a gradient (concrete off): backends are called as before."""
    from rnndrop.kernels import BACKENDS, LayerInputs, LayerMasks
    from rnndrop.nn.cells import LSTM_CELL

    T, B, H = 3, 2, 4
    masks = LayerMasks(candidate=torch.rand(1, B, H))
    inp = LayerInputs(LSTM_CELL, torch.randn(T, B, 3), torch.randn(4 * H, 3), torch.randn(4 * H),
                      torch.randn(4 * H, H), None, torch.randn(B, H), torch.randn(B, H),
                      masks)  # fmt: skip
    s = BACKENDS["python"].forward(inp)
    g = BACKENDS["python"].backward(inp, s, torch.randn(T, B, H), None, True, True)
    assert g.dmasks is None


# ---- rates stay in (0, 1) -----------------------------------------------------------------


@pytest.mark.parametrize("direction", [1.0, -1.0])
def test_rates_stay_in_open_interval(direction):
    """SGD steps of size 1e6 on the logits, both ways: rates pinned inside
    ``CONCRETE_RATE_BOUNDS``, outputs and gradients finite, and a step back moves them."""
    lo, hi = CONCRETE_RATE_BOUNDS
    m = LSTM(3, 4, dropout=RD(input=0.2, recurrent=0.2, zoneout_hidden=0.1, weight_hh=0.3,
                              output=0.2, concrete=True))  # fmt: skip
    opt = torch.optim.SGD(m.parameters(), lr=1e6)
    x = torch.randn(5, 2, 3)
    for _ in range(3):
        opt.zero_grad()
        for p in m.concrete_parameters().values():
            p.grad = torch.full_like(p, -direction)  # descent moves θ by +direction·1e6
        opt.step()
        for p in m.concrete_parameters().values():
            p.grad = None
        for site, rate in m.concrete_rates().items():
            # saturated: σ(±b) in float32, within a few ulps of the bounds
            assert lo - 1e-6 <= rate <= hi + 1e-6 and 0.0 < rate < 1.0, (site, rate)
        out, _ = m(x)
        loss = out.square().sum() + m.concrete_regularizer(10, output_weight=torch.ones(2, 4))
        assert torch.isfinite(out).all() and torch.isfinite(loss)
        loss.backward()
        for site, p in m.concrete_parameters().items():
            assert torch.isfinite(p.grad).all(), site
    # the bound is smooth (tanh), not a clamp: the gradient never vanishes exactly
    theta = torch.tensor(40.0 * direction, dtype=torch.float64, requires_grad=True)
    torch.sigmoid(concrete_logit(theta)).backward()
    assert theta.grad != 0


# ---- eval at the learned rates -----------------------------------------------------------------


def _set_rate(m, site, p):
    with torch.no_grad():
        getattr(m, f"dropout_logit_{site}").fill_(concrete_logit_init(p))


def test_deterministic_eval_is_identity_for_dropout():
    m = LSTM(3, 4, num_layers=2, dropout=RD.variational(0.3, concrete=True)).double()
    _set_rate(m, "recurrent", 0.7)
    ref = torch.nn.LSTM(3, 4, num_layers=2).double()
    ref.load_state_dict({k: v for k, v in m.state_dict().items() if "logit" not in k})
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    m.eval()
    assert torch.equal(m(x)[0], ref(x)[0])


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_zoneout_eval_uses_the_learned_rate(cell):
    cfg = _cfg(cell, RD.zoneout(0.1, 0.2, concrete=True))
    m = _model(cell, cfg, num_layers=1, bidirectional=False)
    _set_rate(m, "zoneout_hidden", 0.45)
    if cell == "lstm":
        _set_rate(m, "zoneout_cell", 0.6)
    learned = m.concrete_rates()
    fixed = _model(cell, _cfg(cell, RD(zoneout_hidden=learned["zoneout_hidden"],
                                       zoneout_cell=learned.get("zoneout_cell", 0.0))),
                   num_layers=1, bidirectional=False)  # fmt: skip
    fixed.load_state_dict({k: v for k, v in m.state_dict().items() if "logit" not in k})
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    m.eval()
    fixed.eval()
    torch.testing.assert_close(m(x)[0], fixed(x)[0], atol=1e-12, rtol=0)


def test_mc_samples_hard_masks_at_learned_rates():
    cfg = RD(recurrent=0.2, output=0.2, zoneout_hidden=0.1, concrete=True)
    m = LSTM(3, 64, dropout=cfg)
    _set_rate(m, "recurrent", 0.6)
    _set_rate(m, "zoneout_hidden", 0.3)
    m.record_masks = True
    m.eval()
    x = torch.randn(20, 64, 3)
    with torch.no_grad(), mc_dropout(m):
        m(x)
    rec = m.last_masks["recurrent/l0"]
    values = sorted(rec.unique().tolist())
    assert len(values) == 2 and values[0] == 0.0 and values[1] == pytest.approx(1 / 0.4, rel=1e-4)
    # 64·64 draws: the fraction dropped has sd ~0.008
    assert (rec == 0).float().mean().item() == pytest.approx(0.6, abs=0.04)
    zh = m.last_masks["zoneout_hidden/l0"]
    assert set(zh.unique().tolist()) <= {0.0, 1.0}
    assert zh.mean().item() == pytest.approx(0.3, abs=0.02)  # 20·64·64 draws
    out = m.last_masks["output"]  # the output rate is still the initial 0.2
    assert (out == 0).float().mean().item() == pytest.approx(0.2, abs=0.04)


def test_training_masks_are_relaxed():
    m = LSTM(3, 32, dropout=RD(recurrent=0.3, concrete=True, temperature=0.5))
    m.record_masks = True
    m(torch.randn(4, 16, 3))
    rec = m.last_masks["recurrent/l0"]
    assert not rec.requires_grad  # recorded detached: last_masks holds no graph (issue 20)
    inside = ((rec > 1e-3) & (rec < 1 / 0.7 - 1e-3)).float().mean().item()
    assert inside > 0.1  # relaxed values, not a 0 / (1/(1-p)) mask


# ---- the regulariser ----------------------------------------------------------------------------


def test_regularizer_matches_the_paper():
    cfg = RD(input=0.2, between_layers=0.3, recurrent=0.25, output=0.1, candidate=0.15,
             weight_hh=0.35, zoneout_hidden=0.05, concrete=True)  # fmt: skip
    m = LSTM(3, 4, num_layers=2, bidirectional=True, dropout=cfg).double()
    dec = torch.randn(7, 8, dtype=torch.float64)
    N, ls = 1000, 1e-2
    terms = m.concrete_regularizer_terms(N, ls, output_weight=dec)
    assert set(terms) == set(cfg.concrete_sites)

    def sq(names):
        return sum(float(getattr(m, n).detach().square().sum()) for n in names)

    def neg_h(p):
        return p * math.log(p) + (1 - p) * math.log(1 - p)

    ih0 = ["weight_ih_l0", "weight_ih_l0_reverse"]
    ih1 = ["weight_ih_l1", "weight_ih_l1_reverse"]
    hh = ["weight_hh_l0", "weight_hh_l0_reverse", "weight_hh_l1", "weight_hh_l1_reverse"]
    expect = {  # site: (‖W‖², K)
        "input": (sq(ih0), 2 * 3),
        "between_layers": (sq(ih1), 2 * 8),
        "recurrent": (sq(hh), 4 * 4),
        "weight_hh": (sq(hh), 4 * 16 * 4),
        "output": (float(dec.square().sum()), 8),
        "candidate": (0.0, 4 * 4),
        "zoneout_hidden": (0.0, 4 * 4),
    }
    rates = m.concrete_rates()  # the config's, to float32 rounding (the logits began float32)
    for site, (w2, K) in expect.items():
        p = rates[site]
        assert p == pytest.approx(getattr(cfg, site), rel=1e-6)
        weight, entropy = terms[site]
        # l²(1-p)/(2N) ‖M‖² with M = W/(1-p) (inverted scaling)
        assert weight.item() == pytest.approx(ls**2 * (1 - p) / (2 * N) * w2 / (1 - p) ** 2,
                                              rel=1e-9), site  # fmt: skip
        assert entropy.item() == pytest.approx(K / N * neg_h(p), rel=1e-9), site
    total = m.concrete_regularizer(N, ls, output_weight=dec)
    assert total.item() == pytest.approx(sum((w + e).item() for w, e in terms.values()), rel=1e-12)
    # the overrides: the paper's regression code, precision τ
    tau = 2.0
    t2 = m.concrete_regularizer_terms(N, weight_regularizer=ls**2 / (tau * N),
                                      dropout_regularizer=2 / (tau * N))  # fmt: skip
    p = rates["recurrent"]
    assert t2["recurrent"][0].item() == pytest.approx(ls**2 / (tau * N) * sq(hh) / (1 - p))
    assert t2["recurrent"][1].item() == pytest.approx(2 / (tau * N) * 16 * neg_h(p))
    # gradients reach the logits and the weights
    total.backward()
    for site, par in m.concrete_parameters().items():
        assert par.grad is not None and par.grad != 0, site
    assert m.weight_hh_l0.grad is not None
    with pytest.raises(ValueError, match="dataset_size"):
        m.concrete_regularizer(0)


def test_entropy_term_pulls_rates_to_one_half():
    m = LSTM(3, 4, dropout=RD(input=0.1, recurrent=0.8, concrete=True))
    reg = m.concrete_regularizer(10, length_scale=0.0)
    reg.backward()
    assert m.dropout_logit_input.grad < 0  # descent raises the rate towards 0.5
    assert m.dropout_logit_recurrent.grad > 0  # and lowers it towards 0.5


# ---- a toy task: the noise site's rate rises -------------------------------------------------


@pytest.fixture
def one_thread():
    """This test's many tiny ops run ~30x faster on one thread on a loaded machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _toy(signal: bool, seed: int) -> float:
    torch.manual_seed(seed)
    N, T, I, H = 64, 5, 4, 8
    x = torch.randn(N, T, I)
    # signal: the label is the sign of feature 0's sum; noise: the input says nothing
    y = (x[:, :, 0].sum(1) > 0).long() if signal else torch.zeros(N, dtype=torch.long)
    lstm = LSTM(I, H, batch_first=True, dropout=RD(input=0.2, concrete=True))
    head = torch.nn.Linear(H, 2)
    opt = torch.optim.Adam([*lstm.parameters(), *head.parameters()], lr=0.05)
    for _ in range(60):
        out, _ = lstm(x)
        loss = torch.nn.functional.cross_entropy(head(out[:, -1]), y)
        loss = loss + lstm.concrete_regularizer(N, output_weight=head.weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return lstm.concrete_rates()["input"]


@pytest.mark.parametrize("seed", [0, 1])
def test_noise_site_rate_rises(seed, one_thread):
    """Concrete dropout's selling point on the smallest case: the input site carries only
    noise, the model learns to ignore it (the data term stops caring about its rate) and the
    entropy term lifts the rate from 0.2 towards 0.5 (measured 0.50-0.51 over seeds 0-2); with
    the label in the input, the data term holds the rate down (measured 0.06-0.09)."""
    noise, signal = _toy(False, seed), _toy(True, seed)
    assert noise > 0.4  # rose from 0.2
    assert signal < 0.2  # fell from 0.2


# ---- a whole model --------------------------------------------------------------------------


def test_model_level_helpers():
    from rnndrop.nn import concrete_rates, concrete_regularizer

    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = LSTM(3, 4, dropout=RD(recurrent=0.2, output=0.3, concrete=True))
            self.b = GRU(4, 5, dropout=RD(input=0.25, concrete=True))
            self.plain = LSTM(5, 5, dropout=RD.variational(0.2))  # fixed rates: not listed
            self.dec = torch.nn.Linear(5, 7)

    model = Two()
    rates = concrete_rates(model)
    assert rates == pytest.approx({"a/recurrent": 0.2, "a/output": 0.3, "b/input": 0.25},
                                  abs=1e-6)  # fmt: skip
    assert concrete_rates(model.a) == model.a.concrete_rates()
    N = 50
    total = concrete_regularizer(model, N, output_weight=model.dec.weight)
    expect = (model.a.concrete_regularizer(N, output_weight=model.b.weight_ih_l0)
              + model.b.concrete_regularizer(N, output_weight=model.dec.weight))  # fmt: skip
    torch.testing.assert_close(total, expect)
    assert float(concrete_regularizer(torch.nn.Linear(2, 2), N)) == 0.0


def test_step_cells_refuse_concrete():
    from rnndrop.nn import LSTMCell

    with pytest.raises(ValueError, match="concrete=True"):
        LSTMCell(3, 4, dropout=RD(recurrent=0.2, concrete=True))


def test_folded_untied_input_masks_multi_layer():
    """Regression (found here): untied per-batch per-sequence input masks fold into layer
    0's ``W_ih`` only; the one-fused-call path folded them into every layer's."""
    cfg = RD(input=0.3, recurrent=0.3, batch="per_batch", tied=False)
    torch.manual_seed(0)
    m = LSTM(3, 4, num_layers=2, dropout=cfg).double()
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    torch.manual_seed(1)
    fused, _ = m(x)
    m.force_loop = True  # the same masks, drawn in the same order, through the loop path
    torch.manual_seed(1)
    looped, _ = m(x)
    torch.testing.assert_close(fused, looped, atol=1e-12, rtol=0)


def test_language_model_init_range_keeps_the_concrete_rates():
    from rnndrop.models import LanguageModel

    model = LanguageModel(50, embedding_size=8, hidden_size=8, num_layers=2, init_range=0.1,
                          dropout=RecurrentDropout.variational(0.3, concrete=True))  # fmt: skip
    from rnndrop.nn import concrete_rates

    rates = concrete_rates(model)
    assert rates and all(r == pytest.approx(0.3, abs=1e-6) for r in rates.values())
    assert all(p.abs().max() <= 0.1 for n, p in model.named_parameters() if "logit" not in n)
