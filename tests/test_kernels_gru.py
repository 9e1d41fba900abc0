"""The compiled GRU loop (``loop.cpp``: ``gru_forward`` / ``gru_backward``) against the
``python`` reference backend: outputs, saved tensors and every gradient, for every mask
site alone and all together, both directions, with and without the input projection and
the biases; and a float64 gradcheck of the compiled backward.
"""

import pytest
import torch

from rnndrop.kernels import BACKENDS, LayerInputs, LayerMasks, rnn_layer
from rnndrop.kernels.cpp import build
from rnndrop.nn.cells import GRU_CELL

pytestmark = pytest.mark.skipif(
    build.load() is None, reason="the compiled loop kernel is unavailable"
)

G = 3
TOL = {torch.float64: dict(atol=1e-10, rtol=1e-10), torch.float32: dict(atol=2e-5, rtol=1e-4)}

# mask site -> options; each case below turns on some of them
#   rec: (Tm, Gr) of the recurrent mask; inp: (Tm, batch) of the untied input masks;
#   cand: Tm of the candidate mask; zone: "sampled" (0/1 per step) or "eval" (z, shared)
CASES = {
    "none": {},
    "rec_tied_shared": dict(rec=("1", 1)),
    "rec_tied_per_step": dict(rec=("T", 1)),
    "rec_untied_shared": dict(rec=("1", G)),
    "rec_untied_per_step": dict(rec=("T", G)),
    "input_untied": dict(inp=("T", "B")),
    "input_untied_shared": dict(inp=("1", "1")),
    "candidate": dict(cand="T"),
    "candidate_shared": dict(cand="1"),
    "zoneout": dict(zone="sampled"),
    "zoneout_eval": dict(zone="eval"),
    "everything_untied": dict(rec=("T", G), inp=("T", "B"), cand="T", zone="sampled"),
    "everything_tied": dict(rec=("1", 1), inp=("1", "B"), cand="1", zone="eval"),
}


def _drop(shape, p, dtype):
    """An inverted-dropout mask: 0 or 1/(1-p)."""
    return (torch.rand(shape) >= p).to(dtype) / (1 - p)


def make_masks(case, T, B, I, H, dtype):
    spec = CASES[case]
    m = LayerMasks()
    steps = {"T": T, "1": 1}
    if "rec" in spec:
        tm, gr = spec["rec"]
        m.recurrent = _drop((steps[tm], gr, B, H), 0.3, dtype)
    if "inp" in spec:
        tm, batch = spec["inp"]
        m.input = _drop((G, steps[tm], B if batch == "B" else 1, I), 0.3, dtype)
    if "cand" in spec:
        m.candidate = _drop((steps[spec["cand"]], B, H), 0.3, dtype)
    if spec.get("zone") == "sampled":
        m.zoneout_h = (torch.rand(T, B, H) < 0.4).to(dtype)
        m.zoneout_h[-1, 0] = 1.0  # a padded step: carry h exactly
    elif spec.get("zone") == "eval":
        m.zoneout_h = torch.full((1, B, H), 0.3, dtype=dtype)
    return m


def make_inputs(dtype, projected, bias, T=5, B=3, I=4, H=6):
    """Leaves: x, w_ih, b_x, w_hh, b_h, h0 (None where absent)."""

    def leaf(*shape, scale=1.0):
        return (torch.randn(*shape, dtype=dtype) * scale).requires_grad_()

    if projected:  # x is the input projection, its bias included
        x, w_ih, b_x = leaf(T, B, G * H), None, None
    else:
        x, w_ih = leaf(T, B, I), leaf(G * H, I, scale=0.5)
        b_x = leaf(G * H, scale=0.5) if bias else None
    w_hh = leaf(G * H, H, scale=0.5)
    b_h = leaf(G * H, scale=0.5) if bias else None
    h0 = leaf(B, H, scale=0.5)
    return [x, w_ih, b_x, w_hh, b_h, h0]


def run(backend, leaves, masks, reverse, weight):
    x, w_ih, b_x, w_hh, b_h, h0 = leaves
    h_seq, c_last = rnn_layer(GRU_CELL, x, w_ih, b_x, w_hh, b_h, h0, None, masks,
                              reverse=reverse, backend=backend)  # fmt: skip
    assert c_last is None
    present = [t for t in leaves if t is not None and t.requires_grad]
    grads = torch.autograd.grad((h_seq * weight).sum(), present)
    return h_seq, grads


def assert_agree(leaves, masks, reverse, dtype):
    x = leaves[0]
    T, B = x.shape[:2]
    H = leaves[3].shape[1]
    weight = torch.randn(T, B, H, dtype=dtype)
    out_c, grads_c = run("cpp", leaves, masks, reverse, weight)
    out_p, grads_p = run("python", leaves, masks, reverse, weight)
    torch.testing.assert_close(out_c, out_p, **TOL[dtype])
    assert len(grads_c) == len(grads_p)
    for gc, gp in zip(grads_c, grads_p, strict=True):
        torch.testing.assert_close(gc, gp, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("projected", [False, True], ids=["w_ih", "projected"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("case", list(CASES))
def test_cpp_matches_python(case, reverse, projected, bias, dtype):
    leaves = make_inputs(dtype, projected, bias)
    masks = make_masks(case, 5, 3, 4, 6, dtype)
    if projected:
        masks.input = None  # input masks act on x before the projection
    assert_agree(leaves, masks, reverse, dtype)


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("shape", [(1, 1, 2, 3), (1, 4, 3, 5), (7, 1, 3, 4), (6, 9, 5, 33)])
def test_shapes(shape, reverse):
    """One step, one sample, and an odd H past a vector width."""
    T, B, I, H = shape
    for case in ("none", "everything_untied"):
        leaves = make_inputs(torch.float64, False, True, T, B, I, H)
        assert_agree(leaves, make_masks(case, T, B, I, H, torch.float64), reverse, torch.float64)
        leaves = make_inputs(torch.float32, False, True, T, B, I, H)
        assert_agree(leaves, make_masks(case, T, B, I, H, torch.float32), reverse, torch.float32)


@pytest.mark.parametrize("wants", ["x", "weights", "h0"])
def test_partial_gradients(wants):
    """need_x / need_w off: only the asked-for gradients, still equal to the reference."""
    leaves = make_inputs(torch.float64, False, True)
    names = ["x", "w_ih", "b_x", "w_hh", "b_h", "h0"]
    keep = {"x": {"x"}, "weights": {"w_ih", "b_x", "w_hh", "b_h"}, "h0": {"h0"}}[wants]
    for name, t in zip(names, leaves, strict=True):
        t.requires_grad_(name in keep)
    masks = make_masks("everything_untied", 5, 3, 4, 6, torch.float64)
    assert_agree(leaves, masks, False, torch.float64)


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("case", ["none", "rec_tied_shared", "everything_untied"])
def test_saved_tensors_match_the_contract(case, reverse):
    """acts, h_seq, hm_seq and hn_seq in the contract's layouts, equal to the reference's."""
    dtype = torch.float64
    x, w_ih, b_x, w_hh, b_h, h0 = (t if t is None else t.detach()
                                   for t in make_inputs(dtype, False, True))  # fmt: skip
    masks = make_masks(case, 5, 3, 4, 6, dtype)
    inp = LayerInputs(GRU_CELL, x, w_ih, b_x, w_hh, b_h, h0, None, masks, reverse)
    saved_c = BACKENDS["cpp"].forward(inp)
    saved_p = BACKENDS["python"].forward(inp)
    for a, b in zip(saved_c.tensors(), saved_p.tensors(), strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            assert a.shape == b.shape and a.is_contiguous()
            torch.testing.assert_close(a, b, **TOL[dtype])
    # backward with no gradient from the output (dh_seq None) is all zeros
    g = BACKENDS["cpp"].backward(inp, saved_c, None, None, True, True)
    for t in (g.dx, g.dw_ih, g.db_x, g.dw_hh, g.db_h, g.dh0):
        assert t is not None and t.abs().max() == 0
    assert g.dc0 is None


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("projected", [False, True], ids=["w_ih", "projected"])
def test_gradcheck_cpp(reverse, projected):
    T, B, I, H = 3, 2, 3, 2
    dtype = torch.float64
    leaves = make_inputs(dtype, projected, True, T, B, I, H)
    masks = make_masks("everything_untied", T, B, I, H, dtype)
    masks.zoneout_h = torch.rand(T, B, H, dtype=dtype)  # fractional weights too
    if projected:
        masks.input = None
    present = [t for t in leaves if t is not None]

    def f(*args):
        it = iter(args)
        full = [None if t is None else next(it) for t in leaves]
        x, w_ih, b_x, w_hh, b_h, h0 = full
        h_seq, _ = rnn_layer(GRU_CELL, x, w_ih, b_x, w_hh, b_h, h0, None, masks,
                             reverse=reverse, backend="cpp")  # fmt: skip
        return h_seq

    assert torch.autograd.gradcheck(f, present, atol=1e-7, rtol=1e-5)
