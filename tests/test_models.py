"""Models (LSTM, GRU and transformer encoders), the transformer baseline and
gradient-through-time."""

import math

import pytest
import torch

from rnndrop.analysis import gradient_through_time
from rnndrop.config import RecurrentDropout as RD
from rnndrop.config import TransformerDropout as TD
from rnndrop.config import as_dropout
from rnndrop.models import LanguageModel, RecurrentStack, SequenceModel
from rnndrop.nn import GRU, LSTM, CausalTransformer, mc_dropout

RNNS = {"lstm": LSTM, "gru": GRU}


def hidden(state, cell):
    """``h`` of a one-part stack's state: ``(h, c)`` for the LSTM, ``h`` for the GRU."""
    return state[0] if cell == "lstm" else state


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_awd_stack_applies_every_mask_once(cell):
    lm = LanguageModel(30, 6, 10, 3, encoder=cell, dropout=RD.awd(0.0, 0.3, 0.2, 0.25, 0.4),
                       tie_weights=True)  # fmt: skip
    first, last = lm.encoder.parts
    assert isinstance(first, RNNS[cell]) and isinstance(last, RNNS[cell])
    for part in (first, last):
        part.record_masks = True
    lm(torch.randint(0, 30, (4, 5)))
    assert sorted(first.last_masks) == [
        "between_layers/l1",
        "input/l0",
        "output",
        "weight_hh/l0",
        "weight_hh/l1",
    ]
    assert sorted(last.last_masks) == ["output", "weight_hh/l0"]  # no second input mask
    assert (first.last_masks["output"] == 0).float().mean() > 0  # first part's output = between
    assert last.hidden_size == 6 and lm.decoder.weight is lm.embedding.weight
    # the state: one per part, (h, c) for the LSTM and h for the GRU; carried into the next call
    state = lm(torch.randint(0, 30, (4, 5))).state
    assert isinstance(state, list) and len(state) == 2
    assert [tuple(hidden(s, cell).shape) for s in state] == [(2, 4, 10), (1, 4, 6)]
    assert lm(torch.randint(0, 30, (4, 3)), state).logits.shape == (4, 3, 30)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_stack_equals_one_rnn_without_dropout(cell):
    lm = LanguageModel(30, 10, 10, 3, encoder=cell, tie_weights=False)
    assert isinstance(lm.encoder, RecurrentStack) and lm.encoder.cell == cell
    single = RNNS[cell](10, 10, 3, batch_first=True)
    single.load_state_dict(lm.encoder.parts[0].state_dict())
    x = torch.randint(0, 30, (2, 7))
    out, _, state = lm.encoder(lm.features(x))
    ref, ref_state = single(lm.features(x))
    assert torch.equal(out, ref) and torch.equal(hidden(state, cell), hidden(ref_state, cell))


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_language_model_carries_state(cell):
    lm = LanguageModel(20, 6, 8, 2, encoder=cell, dropout=RD.zoneout(0.2, 0.0)).eval()
    x = torch.randint(0, 20, (3, 10))
    whole = lm(x).logits
    first = lm(x[:, :4])
    second = lm(x[:, 4:], first.state).logits
    torch.testing.assert_close(torch.cat([first.logits, second], 1), whole)


def periodic_corpus(n: int = 400, vocab: int = 7) -> torch.Tensor:
    """A generated token stream a model can learn: a random permutation of the vocabulary,
    repeated (every token determines the next)."""
    g = torch.Generator().manual_seed(0)
    return torch.randperm(vocab, generator=g).repeat(n // vocab + 1)[:n]


@pytest.mark.parametrize("dropout", [None, "variational", {"preset": "awd", "wdrop": 0.2}])
def test_gru_language_model_trains_and_its_loss_decreases(dropout):
    torch.manual_seed(0)
    stream = periodic_corpus()
    lm = LanguageModel(7, 8, 16, 2, encoder="gru", dropout=dropout, tie_weights=True)
    assert isinstance(lm.encoder.parts[-1], GRU)
    opt = torch.optim.Adam(lm.parameters(), lr=0.02)
    batch = stream[: 8 * 49].view(8, 49)  # 8 contiguous streams, chunks of 12 (TBPTT)
    losses, state = [], None
    for step in range(24):
        t = (step % 4) * 12
        x, y = batch[:, t : t + 12], batch[:, t + 1 : t + 13]
        out = lm(x, None if t == 0 else state)  # the carried state: a list of two GRU h
        state = [s.detach() for s in out.state]
        loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-4:]) / 4 < 0.75 * sum(losses[:4]) / 4, losses


@pytest.mark.parametrize(
    "dropout",
    [RD.variational(0.3), {"recurrent": 0.2, "tied": False}, "variational",
     {"preset": "variational", "p": 0.3}, 0.3, None],
)  # fmt: skip
@pytest.mark.parametrize("cls", ["lm", "seq"])
def test_every_dropout_form_is_converted_once(dropout, cls):
    """What ``as_dropout`` takes reaches the layers as one object; hparams keep plain data."""
    if cls == "lm":
        m = LanguageModel(10, 4, 6, 2, encoder="gru", dropout=dropout)
    else:
        m = SequenceModel("tokens", vocab_size=5, num_layers=2, encoder="gru", dropout=dropout)
    want = as_dropout(dropout)
    assert m.dropout == want and m.encoder.parts[0].dropout is m.dropout  # no copies
    assert m.config["dropout"] == want.to_dict() and m.config["encoder"] == "gru"
    assert isinstance(m.config["transformer_dropout"], dict)
    rebuilt = type(m)(**m.config)  # from a checkpoint's hyperparameters
    assert rebuilt.dropout == want


@pytest.mark.parametrize("tie", [False, True])
def test_gru_with_zoneout_cell_fails_with_the_grus_error(tie):
    # the preset name "zoneout" is read for the GRU (zoneout on h): tests/test_presets.py
    for dropout in (RD.zoneout(0.1, 0.2), {"zoneout_cell": 0.1}):
        with pytest.raises(ValueError, match=r"zoneout_cell.*no meaning for a GRU"):
            LanguageModel(10, 4, 6, 2, encoder="gru", dropout=dropout, tie_weights=tie)
    with pytest.raises(ValueError, match=r"zoneout_cell.*no meaning for a GRU"):
        SequenceModel("float", input_size=2, encoder="gru", dropout={"zoneout_cell": 0.1})
    m = SequenceModel("float", input_size=2, encoder="gru", dropout=RD.zoneout(0.1, 0.0))
    assert m.encoder.parts[0].dropout.zoneout_hidden == 0.1  # hidden-only zoneout is fine


def test_sequence_model_with_a_gru():
    m = SequenceModel("tokens", vocab_size=7, output_size=5, hidden_size=12, num_layers=2,
                      encoder="gru", dropout="variational")  # fmt: skip
    out = m(torch.randint(0, 7, (3, 9)))
    assert out.prediction.shape == (3, 9, 5) and out.state.shape == (2, 3, 12)
    assert isinstance(m.encoder.parts[0], GRU)
    m = SequenceModel("float", input_size=2, output_size=1, target="last", encoder="gru")
    assert m(torch.randn(4, 6, 2)).prediction.shape == (4, 1)
    names = r"\['lstm', 'gru', 'rnn', 'layernorm_lstm', 'tra"
    with pytest.raises(ValueError, match=r"encoder must be one of " + names):
        SequenceModel("float", input_size=2, encoder="mlp")


def test_sequence_model_inputs_and_errors():
    m = SequenceModel("float", input_size=3, output_size=1, target="last")
    assert m(torch.randn(2, 9, 3)).prediction.shape == (2, 1)
    m = SequenceModel("tokens", vocab_size=7, output_size=5)
    assert m(torch.randint(0, 7, (2, 9))).prediction.shape == (2, 9, 5)
    for kw, match in [
        ({"input_kind": "tokens"}, "vocab_size"),
        ({"input_kind": "float"}, "input_size"),
        ({"input_kind": "image"}, "input_kind"),
        ({"input_kind": "float", "input_size": 2, "target": "first"}, "target"),
    ]:
        with pytest.raises(ValueError, match=match):
            SequenceModel(**kw)


# ---- transformer -------------------------------------------------------------------------


def test_transformer_is_causal():
    m = CausalTransformer(4, 16, 2, 4).eval()
    x = torch.randn(9, 2, 4)
    y = m(x)[0]
    x2 = x.clone()
    x2[6] += 1.0
    y2 = m(x2)[0]
    assert torch.equal(y[:6], y2[:6]) and not torch.allclose(y[6:], y2[6:])


def test_transformer_dropout_sites_and_modes():
    cfg = TD(embedding=0.3, attention=0.3, residual=0.3, ffn=0.3, drop_path=0.4)
    m = CausalTransformer(4, 16, 5, 4, dropout=cfg)
    assert [b.drop_path for b in m.blocks] == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])
    x = torch.randn(7, 3, 4)
    assert not torch.equal(m(x)[0], m(x)[0])  # training samples
    m.eval()
    assert torch.equal(m(x)[0], m(x)[0])  # eval is deterministic
    with mc_dropout(m):
        assert not torch.equal(m(x)[0], m(x)[0])  # MC samples in eval mode


@pytest.mark.parametrize("site", ["embedding", "attention", "residual", "ffn", "drop_path"])
def test_each_transformer_site_acts(site):
    m = CausalTransformer(4, 16, 2, 4, dropout=TD(**{site: 0.5}))
    x = torch.randn(7, 3, 4)
    torch.manual_seed(0)
    a = m(x)[0]
    torch.manual_seed(1)
    assert not torch.equal(a, m(x)[0])  # a different seed changes the output: the site draws


def test_transformer_batch_first_and_positions():
    a = CausalTransformer(4, 8, 1, 2, positions="learned", max_len=6)
    b = CausalTransformer(4, 8, 1, 2, positions="learned", max_len=6, batch_first=True)
    b.load_state_dict(a.state_dict())
    a.eval(), b.eval()
    x = torch.randn(5, 2, 4)
    torch.testing.assert_close(a(x)[0], b(x.transpose(0, 1))[0].transpose(0, 1))
    with pytest.raises(ValueError, match="max_len"):
        a(torch.randn(7, 2, 4))


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"num_heads": 3}, "divisible"),
        ({"positions": "rope"}, "positions"),
        ({"dropout": {"attention": 1.2}}, "attention"),
        ({"dropout": {"atention": 0.1}}, "atention"),
    ],
)
def test_transformer_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        CausalTransformer(4, 16, 1, **{"num_heads": 4, **kw})


def test_transformer_language_model_swaps_in():
    lm = LanguageModel(20, 16, 16, 2, encoder="transformer", tie_weights=True)
    out = lm(torch.randint(0, 20, (3, 8)))
    assert out.logits.shape == (3, 8, 20) and out.state is None
    with pytest.raises(ValueError, match="hidden_size == embedding_size"):
        LanguageModel(20, 8, 16, 2, encoder="transformer", tie_weights=True)


@pytest.mark.parametrize("cls", ["lm", "seq"])
def test_one_dropout_argument_per_encoder(cls):
    """A TransformerDropout given as ``dropout`` is the transformer's dropout: the same model
    (recorded config, weights, training-mode outputs) as when given as transformer_dropout."""
    td = TD(attention=0.2, residual=0.1, ffn=0.3)

    def build(**kw):
        torch.manual_seed(0)
        if cls == "lm":
            return LanguageModel(20, 16, 16, 2, encoder="transformer", **kw)
        return SequenceModel("tokens", vocab_size=20, embedding_size=16, hidden_size=16,
                             num_layers=2, encoder="transformer", **kw)  # fmt: skip

    one, two = build(dropout=td), build(transformer_dropout=td.to_dict())
    assert one.config == two.config
    assert one.config["transformer_dropout"]["attention"] == 0.2
    assert one.config["dropout"] == RD().to_dict()
    x = torch.randint(0, 20, (3, 8))
    torch.manual_seed(1)
    a = one.train()(x)[0]
    torch.manual_seed(1)
    b = two.train()(x)[0]
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="for the transformer encoder"):
        SequenceModel("float", input_size=2, encoder="lstm", dropout=td)
    with pytest.raises(ValueError, match="once"):
        build(dropout=td, transformer_dropout={"attention": 0.1})


# ---- gradient through time ---------------------------------------------------------------


class LinearEncoder(torch.nn.Module):
    """h_t = a h_{t-1} + x_t, with the encoder contract (out, pre-dropout out, state)."""

    def __init__(self, a: float):
        super().__init__()
        self.a = a

    def forward(self, x, state=None):
        h = torch.zeros(x.shape[0], x.shape[2]) if state is None else state
        outs = []
        for t in range(x.shape[1]):
            h = self.a * h + x[:, t]
            outs.append(h)
        out = torch.stack(outs, 1)
        return out, out, h


class LinearRecurrence(torch.nn.Module):
    """Read out h_T: ∂L/∂x_{T-1-k} = a^k ∂L/∂h_T, a closed form to check against."""

    def __init__(self, a: float):
        super().__init__()
        self.encoder = LinearEncoder(a)

    def features(self, x):
        return x

    def readout(self, h):
        return h


def test_gradient_through_time_closed_form():
    a = 0.8
    model = LinearRecurrence(a)
    x = torch.randn(5, 12, 3)
    y = torch.randn(5)  # one unit, MSE read-out: L = Σ_b (h_T,b - y_b)^2
    x1 = x[..., :1]
    norms = gradient_through_time(model, x1, y, distances=[0, 1, 4, 11])
    h_T = model.encoder(x1)[2].squeeze(-1)
    dL_dh = (2 * (h_T - y)).abs()  # d/dh (h - y)^2 summed per sample
    for k, v in norms.items():
        assert v == pytest.approx(float((dL_dh * a**k).mean()), rel=1e-5)


def test_gradient_through_time_modes_on_an_lstm():
    torch.manual_seed(0)
    m = SequenceModel("tokens", vocab_size=6, output_size=6, hidden_size=16, num_layers=2)
    x = torch.randint(0, 6, (8, 30))
    y = torch.randint(0, 6, (8, 30))
    inp = gradient_through_time(m, x, y, [0, 2, 10, 29])
    st = gradient_through_time(m, x, y, [1, 2, 10, 29], wrt="state")
    assert all(math.isfinite(v) and v >= 0 for v in [*inp.values(), *st.values()])
    assert inp[0] > inp[29] and st[1] > st[29]  # an untrained LSTM forgets
    with pytest.raises(ValueError, match="distances"):
        gradient_through_time(m, x, y, [30])
    with pytest.raises(ValueError, match="target"):
        gradient_through_time(m, x, torch.full_like(y, -100), [1])


def test_gradient_through_time_state_of_a_gru_matches_a_step_by_step_gru_cell():
    """wrt="state" on a GRU is ∂L_T/∂h_(T-1-k), h being the GRU's whole state."""
    torch.manual_seed(2)
    m = SequenceModel("tokens", vocab_size=5, output_size=5, hidden_size=8, num_layers=1,
                      encoder="gru")  # fmt: skip
    x = torch.randint(0, 5, (4, 12))
    y = torch.randint(0, 5, (4, 12))
    ks = [1, 2, 5, 11]
    got = gradient_through_time(m, x, y, ks, wrt="state")
    gru = m.encoder.parts[0]
    cell = torch.nn.GRUCell(gru.input_size, gru.hidden_size)
    cell.load_state_dict({k.removesuffix("_l0"): v for k, v in gru.state_dict().items()})
    feats = m.features(x).detach()
    h = torch.zeros(4, 8)
    hs = []
    for t in range(12):
        h = cell(feats[:, t], h)
        h.retain_grad()
        hs.append(h)
    loss = torch.nn.functional.cross_entropy(m.readout(h), y[:, -1], reduction="sum")
    loss.backward()
    for k in ks:
        want = hs[11 - k].grad.norm(dim=1).mean()
        assert got[k] == pytest.approx(float(want), rel=1e-4), k


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_gradient_through_time_state_of_a_two_part_stack(cell):
    """The AWD stack (two parts): every part's h is a leaf; finite, decaying norms."""
    torch.manual_seed(0)
    lm = LanguageModel(9, 6, 10, 3, encoder=cell, tie_weights=True)
    x = torch.randint(0, 9, (4, 20))
    g = gradient_through_time(lm, x, torch.roll(x, -1, 1), [1, 4, 19], wrt="state")
    assert all(math.isfinite(v) and v > 0 for v in g.values()) and g[1] > g[19]
    tf = LanguageModel(9, 8, 8, 1, encoder="transformer", num_heads=2)
    with pytest.raises(ValueError, match="LSTM or GRU encoder"):
        gradient_through_time(tf, x, x, [1], wrt="state")


def test_gradient_through_time_state_matches_a_step_by_step_lstm_cell():
    """wrt="state" is ∂L_T/∂h_(T-1-k) of the step-by-step graph (h and c separate nodes)."""
    torch.manual_seed(1)
    m = SequenceModel("tokens", vocab_size=5, output_size=5, hidden_size=8, num_layers=1)
    x = torch.randint(0, 5, (4, 12))
    y = torch.randint(0, 5, (4, 12))
    ks = [1, 2, 5, 11]
    got = gradient_through_time(m, x, y, ks, wrt="state")
    lstm = m.encoder.parts[0]
    cell = torch.nn.LSTMCell(lstm.input_size, lstm.hidden_size)
    cell.load_state_dict({k.removesuffix("_l0"): v for k, v in lstm.state_dict().items()})
    feats = m.features(x).detach()
    h = c = torch.zeros(4, 8)
    hs = []
    for t in range(12):
        h, c = cell(feats[:, t], (h, c))
        h.retain_grad()
        hs.append(h)
    loss = torch.nn.functional.cross_entropy(m.readout(h), y[:, -1], reduction="sum")
    loss.backward()
    for k in ks:
        want = hs[11 - k].grad.norm(dim=1).mean()
        assert got[k] == pytest.approx(float(want), rel=1e-4), k
