"""rnndrop.nn.LayerNormLSTM: what only it has. Its schemes on every backend against the
independent LayerNorm LSTM of tests/reference.py (hand-written LayerNorm; outputs and every
gradient, the LayerNorm gains and shift included) are tests/test_parity.py's, as for every
cell.

Here: its parameters and state dicts, no dropout against a second loop written here with
``torch.nn.functional.layer_norm``, no fused op, finite differences and double backward,
mask and parameter gradients of one layer against autograd, concrete rates on both CPU
backends, its sites, every scheme on the Triton step kernels (interpreter, float32, H = 16)
against the python loop, and the language model.
"""

import io
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rnndrop.config import RecurrentDropout as RD
from rnndrop.kernels import (
    BACKENDS,
    LayerInputs,
    LayerMasks,
    loop_backend,
    rnn_layer,
    select_backend,
)
from rnndrop.nn import LayerNormLSTM
from rnndrop.nn.cells import CELLS, LAYERNORM_LSTM_CELL

F64 = torch.float64
CELL = LAYERNORM_LSTM_CELL

SCHEMES = {
    "naive": RD.naive(0.3),
    "naive_recurrent": RD.naive_recurrent(0.3),
    "variational": RD.variational(0.3),
    "variational_untied": RD.variational(0.3, tied=False),
    "variational_per_batch": RD.variational(0.3).replace(batch="per_batch"),
    "recurrent_per_step_per_batch": RD(recurrent=0.3, time="per_step", batch="per_batch"),
    "zoneout": RD.zoneout(hidden=0.2, cell=0.3),
    "weight_drop": RD.weight_drop(0.4),
    "semeniuta": RD.semeniuta(0.3),
    "everything": RD(input=0.2, between_layers=0.2, recurrent=0.2, output=0.2, weight_hh=0.2,
                     candidate=0.2, zoneout_hidden=0.1, zoneout_cell=0.1, tied=False),
    "classic": RD(input=0.2, between_layers=0.2, recurrent=0.2, output=0.3, weight_hh=0.2,
                  candidate=0.2, scaling="classic"),
}  # fmt: skip


def make(scheme=None, layers=2, bidir=False, I=4, H=6, bias=True, **kw):
    """A float64 layer whose LayerNorm gains and shifts are away from 1 and 0 (so that a
    swapped or ignored one shows)."""
    cfg = SCHEMES[scheme] if isinstance(scheme, str) else scheme
    m = LayerNormLSTM(I, H, layers, bias, dropout=cfg, bidirectional=bidir, **kw).to(F64)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.startswith(("gamma", "beta")):
                p.add_(0.5 * torch.randn_like(p))
    return m


def state(L, B=3, H=6):
    return tuple(torch.randn(L, B, H, dtype=F64, requires_grad=True) for _ in range(2))


# ---- parameters ---------------------------------------------------------------------------


def test_parameters_names_shapes_and_init():
    """torch's four per layer and direction (drawn as nn.LSTM draws them), then the LNs'."""
    torch.manual_seed(3)
    ref = nn.LSTM(5, 7, 2, bidirectional=True)
    torch.manual_seed(3)
    ours = LayerNormLSTM(5, 7, 2, bidirectional=True)
    names = dict(ours.named_parameters())
    for sfx in ("_l0", "_l0_reverse", "_l1", "_l1_reverse"):
        for n, shape in (("gamma_ih", 28), ("gamma_hh", 28), ("gamma_c", 7), ("beta_c", 7)):
            assert names[n + sfx].shape == (shape,)
            assert torch.equal(names[n + sfx], torch.full((shape,), 0.0 if n == "beta_c" else 1.0))
    for n, p in ref.named_parameters():
        assert torch.equal(names[n], p), n  # same draws, same order
    # an nn.LSTM state dict loads, leaving exactly the LayerNorm parameters
    missing, unexpected = LayerNormLSTM(5, 7, 2, bidirectional=True).load_state_dict(
        ref.state_dict(), strict=False)  # fmt: skip
    assert not unexpected and {m.split("_l")[0] for m in missing} == {
        "gamma_ih", "gamma_hh", "gamma_c", "beta_c"}  # fmt: skip
    assert CELLS["layernorm_lstm"] is CELL and CELL.fused is None


def test_state_dict_round_trip_and_pickle():
    torch.manual_seed(0)
    a, b = make("zoneout", bidir=True), make("zoneout", bidir=True)
    b.load_state_dict(a.state_dict())
    a.eval()
    b.eval()
    x = torch.randn(5, 3, 4, dtype=F64)
    assert torch.equal(a(x)[0], b(x)[0])
    buf = io.BytesIO()
    torch.save(a, buf)
    buf.seek(0)
    again = torch.load(buf, weights_only=False)
    assert again.cell is not None and again.cell.name == "layernorm_lstm"
    assert torch.equal(again(x)[0], a(x)[0])


# ---- no dropout: a second, plain loop --------------------------------------------------------


def plain_loop(m, x, hx):
    """The equations with torch's layer_norm, one layer and direction at a time."""
    L, D, H = m.num_layers, m.num_directions, m.hidden_size
    h0, c0 = hx
    inp, hs, cs = x, [], []
    for layer in range(L):
        outs = []
        for d in range(D):
            sfx = f"_l{layer}" + ("_reverse" if d else "")
            p = {n: getattr(m, n + sfx) for n in ("weight_ih", "weight_hh", "bias_ih",
                 "bias_hh", "gamma_ih", "gamma_hh", "gamma_c", "beta_c")}  # fmt: skip
            h, c = h0[layer * D + d], c0[layer * D + d]
            ys = [None] * len(inp)
            for t in reversed(range(len(inp))) if d else range(len(inp)):
                a = (F.layer_norm(inp[t] @ p["weight_ih"].t(), (4 * H,), p["gamma_ih"])
                     + F.layer_norm(h @ p["weight_hh"].t(), (4 * H,), p["gamma_hh"])
                     + p["bias_ih"] + p["bias_hh"])  # fmt: skip
                i, f, g, o = a.chunk(4, -1)
                c = i.sigmoid() * g.tanh() + f.sigmoid() * c
                h = o.sigmoid() * F.layer_norm(c, (H,), p["gamma_c"], p["beta_c"]).tanh()
                ys[t] = h
            outs.append(torch.stack(ys))
            hs.append(h)
            cs.append(c)
        inp = torch.cat(outs, -1)
    return inp, (torch.stack(hs), torch.stack(cs))


@pytest.mark.parametrize("bidir,layers", [(False, 1), (True, 2)])
def test_no_dropout_matches_a_plain_loop(bidir, layers, loop_impl):
    torch.manual_seed(2)
    m = make(None, layers, bidir)
    x = torch.randn(6, 3, 4, dtype=F64, requires_grad=True)
    hx = state(layers * (2 if bidir else 1))
    out, (h, c) = m(x, hx)
    want, (wh, wc) = plain_loop(m, x, hx)
    leaves = [x, *hx, *m.parameters()]
    got_g = torch.autograd.grad(out.sin().sum() + h.sum() + c.square().sum(), leaves)
    want_g = torch.autograd.grad(want.sin().sum() + wh.sum() + wc.square().sum(), leaves)
    for a, b in zip((out, h, c, *got_g), (want, wh, wc, *want_g), strict=True):
        torch.testing.assert_close(a, b, atol=1e-11, rtol=1e-11)
    assert m.gamma_c_l0.grad is None  # autograd.grad: nothing accumulated; and not vacuous:
    assert got_g[-1].abs().sum() > 0  # the last LN shift gets a gradient


# ---- every scheme against the independent reference: tests/test_parity.py ----------------------


def test_empty_batch_and_no_fused_op():
    """No fused op: with no dropout and an empty batch the loop runs (and gives empty
    outputs of the right shapes)."""
    m = LayerNormLSTM(4, 6, 2, bidirectional=True).eval()
    out, (h, c) = m(torch.randn(5, 0, 4))
    assert out.shape == (5, 0, 12) and h.shape == c.shape == (4, 0, 6)


# ---- gradients: finite differences, double backward, masks ------------------------------------


@pytest.mark.parametrize("scheme", ["everything", "zoneout", "variational_untied"])
def test_gradcheck_float64(scheme, loop_impl):
    """Every gradient (input, state, all parameters) against finite differences, masks fixed
    by a seed."""
    m = make(scheme, layers=2, bidir=True, I=3, H=3)
    x = torch.randn(3, 2, 3, dtype=F64, requires_grad=True)
    h0, c0 = state(4, B=2, H=3)
    names = [n for n, _ in m.named_parameters()]

    def f(x, h0, c0, *params):
        with torch.random.fork_rng():
            torch.manual_seed(0)
            out, (h, c) = torch.func.functional_call(
                m, dict(zip(names, params, strict=True)), (x, (h0, c0)))  # fmt: skip
        return out, h, c

    assert torch.autograd.gradcheck(f, (x, h0, c0, *m.parameters()))


def test_double_backward_runs_the_reference_step(loop_impl):
    """``create_graph=True`` differentiates the cell's plain-autograd step (F.layer_norm),
    checked by gradgradcheck."""
    m = make("zoneout", layers=1, I=3, H=3)
    x = torch.randn(3, 2, 3, dtype=F64, requires_grad=True)
    names = [n for n, _ in m.named_parameters()]

    def f(x, *params):
        with torch.random.fork_rng():
            torch.manual_seed(0)
            return torch.func.functional_call(m, dict(zip(names, params, strict=True)), (x,))[0]

    assert torch.autograd.gradgradcheck(f, (x, *m.parameters()))


def test_torch_func_grad_equals_backward():
    m = make("variational_untied")
    names = [n for n, _ in m.named_parameters()]
    x = torch.randn(5, 2, 4, dtype=F64)

    def f(*params):
        with torch.random.fork_rng():
            torch.manual_seed(0)
            out = torch.func.functional_call(m, dict(zip(names, params, strict=True)), (x,))
        return out[0].sin().sum()

    params = tuple(p.detach() for p in m.parameters())
    got = torch.func.grad(f, argnums=tuple(range(len(params))))(*params)
    leaves = [p.clone().requires_grad_() for p in params]
    want = torch.autograd.grad(f(*leaves), leaves)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("untied", [False, True])
def test_mask_and_parameter_gradients_of_one_layer_equal_autograd(untied, loop_impl):
    """Concrete dropout's mask gradients and the LN parameters' gradients from a backend
    equal autograd through the plain-autograd step, every mask requiring grad."""
    torch.manual_seed(6)
    T, B, I, H = 4, 3, 5, 4
    Gr = 4 if untied else 1

    def leaf(*shape, low=0.0):
        return (low + torch.rand(*shape, dtype=F64)).requires_grad_()

    x, h0, c0 = leaf(T, B, I), leaf(B, H), leaf(B, H)
    w_ih, w_hh = leaf(4 * H, I, low=-0.5), leaf(4 * H, H, low=-0.5)
    extra = (leaf(4 * H), leaf(4 * H, low=0.5), leaf(4 * H, low=0.5), leaf(H, low=0.5), leaf(H))
    masks = LayerMasks(input=leaf(4, T, B, I) if untied else None,
                       recurrent=leaf(T, Gr, B, H, low=0.5), candidate=leaf(T, B, H, low=0.5),
                       cell=leaf(T, B, H, low=0.5), zoneout_h=leaf(T, B, H),
                       zoneout_c=leaf(T, B, H))  # fmt: skip
    leaves = [x, h0, c0, w_ih, w_hh, *extra, *[m for m in masks.tensors() if m is not None]]
    grads = []
    for reference in (False, True):
        for rev in (False, True):
            h, c = rnn_layer(CELL, x, w_ih, None, w_hh, None, h0, c0, masks, reverse=rev,
                             reference=reference, extra=extra)  # fmt: skip
            grads.append(torch.autograd.grad(h.sin().sum() + c.sum(), leaves))
    for a, b in zip(grads[0] + grads[1], grads[2] + grads[3], strict=True):
        torch.testing.assert_close(a, b, atol=1e-11, rtol=1e-11)


def test_concrete_rates_learn_on_both_backends():
    cfg = RD(recurrent=0.3, candidate=0.2, cell=0.2, zoneout_hidden=0.2, zoneout_cell=0.1,
             time="per_step", concrete=True)  # fmt: skip
    grads = {}
    for backend in ("python", "cpp"):
        torch.manual_seed(0)
        m = LayerNormLSTM(4, 6, 2, dropout=cfg, bidirectional=True).to(F64)
        x = torch.randn(5, 3, 4, dtype=F64)
        torch.manual_seed(1)
        with loop_backend(backend):
            out, (h, c) = m(x)
            (out.square().sum() + h.sum() + c.sum()).backward()
        grads[backend] = {n: p.grad for n, p in m.named_parameters()}
    logits = [n for n in grads["cpp"] if n.startswith("dropout_logit")]
    assert len(logits) == 5 and all(grads["cpp"][n].abs() > 0 for n in logits)
    for n, g in grads["python"].items():
        torch.testing.assert_close(grads["cpp"][n], g, atol=1e-10, rtol=1e-10)


# ---- sites, backends, models --------------------------------------------------------------


def test_every_lstm_site_has_a_meaning():
    LayerNormLSTM(4, 6, dropout=RD(candidate=0.2, cell=0.2, zoneout_cell=0.2))  # no error
    assert LayerNormLSTM(4, 6, dropout="zoneout").dropout.zoneout_cell > 0


CONCRETE = RD(recurrent=0.3, candidate=0.2, zoneout_hidden=0.2, zoneout_cell=0.1, input=0.2,
              tied=False, time="per_step", concrete=True)  # fmt: skip


@pytest.fixture
def interpreter(monkeypatch):
    """Triton's interpreter for this test (``@triton.jit`` reads the variable when the
    backend wraps its kernels, per call)."""
    pytest.importorskip("triton", reason="triton is not installed (the 'triton' extra)")
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.mark.parametrize("scheme", [*SCHEMES, "concrete"])
def test_triton_step_path_matches_python(scheme, interpreter, monkeypatch):
    """Two layers, both directions, training: the Triton step kernels (the one-launch kernel
    has no LayerNorm LSTM) give the python loop's outputs, final states and the gradients
    of the input and of every parameter (the LN gains and shift; with concrete dropout the
    rates, i.e. the mask gradients the kernels write), the masks drawn alike."""
    from rnndrop.kernels import triton as tb

    cfg = CONCRETE if scheme == "concrete" else SCHEMES[scheme]
    torch.manual_seed(1)
    m = make(cfg, bidir=True, H=16).float()  # H = 16: a dropped h_{t-1} rarely leaves LN(hp)
    m.record_masks = True  # a near-constant row, whose rstd would magnify float32 rounding
    launched = []
    kernel = tb._kernel
    monkeypatch.setattr(tb, "_kernel", lambda name, i: launched.append(name) or kernel(name, i))
    x0 = torch.randn(5, 3, 4)
    hx0 = tuple(torch.randn(4, 3, 16) for _ in range(2))
    results = []
    for backend in ("triton", "python"):
        monkeypatch.setenv("RNNDROP_LOOP", backend)
        x, h0, c0 = (t.clone().requires_grad_() for t in (x0, *hx0))
        torch.manual_seed(7)  # the engine draws the masks: same seed, same masks
        out, (h, c) = m(x, (h0, c0))
        params = dict(m.named_parameters())
        loss = out.sin().sum() + h.square().sum() + c.sum()
        grads = torch.autograd.grad(loss, [x, h0, c0, *params.values()])
        results.append(([out, h, c, *grads], dict(m.last_masks)))
    assert set(launched) == {"layernorm_lstm_step_fwd", "layernorm_lstm_step_bwd"}
    assert len(launched) == 2 * 4 * 5  # forward and backward, 4 layers x directions, 5 steps
    (ours, our_masks), (ref, ref_masks) = results
    assert our_masks.keys() == ref_masks.keys()
    for k in our_masks:
        assert torch.equal(our_masks[k], ref_masks[k]), k
    for name, a, b in zip(["out", "h", "c", "x", "h0", "c0", *params], ours, ref, strict=True):
        # float32 relative to the tensor's scale (gradients reach ~150 here, sums over every
        # step through three LayerNorms). Measured against float64 (same masks, one layer):
        # triton, python and cpp in float32 are all within about 2e-6 of the scale
        scale = max(1.0, b.abs().max().item())
        torch.testing.assert_close(a, b, atol=5e-5 * scale, rtol=1e-5,
                                   msg=lambda s, n=name: f"{n}: {s}")  # fmt: skip
    rates = [g for n, g in zip(params, ours[6:], strict=True) if n.startswith("dropout_logit")]
    assert len(rates) == (5 if scheme == "concrete" else 0)  # every site: 5 rates
    assert all(g.abs() > 0 for g in rates)  # not vacuous: the mask gradients reach the rates


def test_triton_runs_the_step_path_and_auto_never_picks_the_interpreter(interpreter,
                                                                        monkeypatch):  # fmt: skip
    x = torch.randn(3, 2, 4)
    extra = tuple(torch.ones(n) for n in (20, 20, 20, 5, 5))
    inp = LayerInputs(CELL, x, torch.randn(20, 4), None, torch.randn(20, 5), None,
                      torch.zeros(2, 5), torch.zeros(2, 5), LayerMasks(), extra=extra)  # fmt: skip
    assert BACKENDS["triton"].unavailable(inp) is None
    assert select_backend(inp, "triton").name == "triton"
    with loop_backend("auto"):
        assert select_backend(inp).name != "triton"
    monkeypatch.setenv("RNNDROP_TRITON_PATH", "loop")
    with pytest.raises(RuntimeError, match="one-launch kernel has no layernorm_lstm cell"):
        select_backend(inp, "triton")


def test_language_model_encoder_drops_word_types():
    """``encoder="layernorm_lstm"``: the embedding site acts in the model, the rest in the
    layer."""
    from rnndrop.models import LanguageModel

    torch.manual_seed(0)
    lm = LanguageModel(vocab_size=30, embedding_size=8, hidden_size=8, num_layers=2,
                       encoder="layernorm_lstm",
                       dropout=RD(embedding=0.5, zoneout_cell=0.1, weight_hh=0.2))  # fmt: skip
    assert isinstance(lm.encoder.parts[0], LayerNormLSTM)
    tokens = torch.randint(0, 30, (4, 6))
    lm.train()
    dropped = lm.features(tokens).abs().sum(-1) == 0
    assert dropped.any() and not dropped.all()
    for b, i in itertools.product(range(4), range(6)):  # one mask per word type
        assert (dropped[b][tokens[b] == tokens[b, i]] == dropped[b, i]).all()
    lm(tokens).logits.sum().backward()
    assert lm.encoder.parts[0].gamma_c_l1.grad is not None
