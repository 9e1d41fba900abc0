"""Higher-order autograd and torch.func for every scheme (issue 20, section 3).

Found from outside: ``create_graph=True`` (gradient penalties, MAML) failed with
``once_differentiable`` for the loop schemes, and ``torch.func.grad``/``vmap``/``jacrev``
failed for variational and zoneout, even ``vmap`` in eval; forward-mode AD (``jacfwd``,
dual tensors) too. Checked here against finite
differences (``gradgradcheck``), against the independent plain LSTM/GRU of
tests/reference.py, and torch.func against ordinary autograd.
"""

from __future__ import annotations

import pytest
import torch
from compare import layer_for
from reference import reference_gru, reference_lstm, reference_rnn
from torch.func import functional_call, grad, jacfwd, jacrev, vmap

from rnndrop.config import RecurrentDropout as RD

F64 = torch.float64

# every loop-path site, tied and untied, per step and per sequence; fused ones too
SCHEMES = {
    "none": None,
    "naive": RD.naive(0.3),
    "variational": RD.variational(0.3),
    "untied": RD.variational(0.3, tied=False),
    "naive_recurrent": RD.naive_recurrent(0.3),
    "zoneout": RD(zoneout_hidden=0.2, zoneout_cell=0.3),
    "semeniuta": RD.semeniuta(0.3),
    "weight_drop": RD.weight_drop(0.3),
    "classic": RD(recurrent=0.3, candidate=0.2, scaling="classic", time="per_sequence"),
}


CELLS = ["lstm", "gru", "rnn"]


def _make(cell: str, scheme: str, layers: int = 1, **kw):
    return layer_for(cell, SCHEMES[scheme], 3, 4, layers, **kw)


def _seeded(module, names):
    """``f(x, *params)``: the module's output with its masks fixed by a seed."""

    def f(x, *params):
        with torch.random.fork_rng():
            torch.manual_seed(0)
            out = functional_call(module, dict(zip(names, params, strict=True)), (x,))
        return out[0]

    return f


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("scheme", ["untied", "naive_recurrent", "zoneout", "semeniuta"])
def test_gradgradcheck_float64(cell, scheme, loop_impl):
    """Second derivatives of the loop layers (the fast node's double backward) against
    finite differences of their first derivatives."""
    m = _make(cell, scheme, dtype=F64).train()
    names = [n for n, _ in m.named_parameters()]
    x = torch.randn(3, 2, 3, dtype=F64, requires_grad=True)
    params = [p.detach().clone().requires_grad_() for p in m.parameters()]
    f = _seeded(m, names)
    assert torch.autograd.gradgradcheck(f, (x, *params))


def _penalty_grads(out_fn, leaves):
    """A gradient penalty: d/dθ ‖d(Σ out²)/dθ‖², through create_graph=True."""
    out = out_fn()
    g = torch.autograd.grad(out.pow(2).sum(), leaves, create_graph=True)
    penalty = sum(gi.pow(2).sum() for gi in g)
    return torch.autograd.grad(penalty, leaves, allow_unused=True)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("scheme", list(SCHEMES))
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_double_backward_matches_independent_reference(cell, scheme, mode, loop_impl):
    """``create_graph=True`` through the module equals the same penalty through the plain
    reference LSTM/GRU run with the masks the module recorded."""
    m = _make(cell, scheme, layers=2, bidirectional=True, dtype=F64)
    getattr(m, mode)()
    m.record_masks = True
    x = torch.randn(4, 2, 3, dtype=F64, requires_grad=True)
    leaves = [x, *m.parameters()]
    ours = _penalty_grads(lambda: m(x)[0], leaves)
    ref = {"lstm": reference_lstm, "gru": reference_gru, "rnn": reference_rnn}[cell]
    masks = dict(m.last_masks)
    theirs = _penalty_grads(lambda: ref(m, x, None, masks, sample=mode == "train")[0], leaves)
    for a, b in zip(ours, theirs, strict=True):
        if a is None or b is None:
            assert (a is None or a.abs().max() == 0) and (b is None or b.abs().max() == 0)
        else:
            torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_torch_func_grad_equals_autograd(cell, scheme):
    """``torch.func.grad`` (the plain-autograd loop) equals ``backward`` (the fast loop
    node, or the fused op), masks fixed by a seed, in training and eval."""
    m = _make(cell, scheme, layers=2, dtype=F64)
    names = [n for n, _ in m.named_parameters()]
    x = torch.randn(5, 2, 3, dtype=F64)
    for mode in ("train", "eval"):
        getattr(m, mode)()
        f = _seeded(m, names)
        params = tuple(p.detach() for p in m.parameters())
        g = grad(lambda *p, f=f: f(x, *p).sin().sum(), argnums=tuple(range(len(params))))(*params)
        leaves = [p.clone().requires_grad_() for p in params]
        want = torch.autograd.grad(f(x, *leaves).sin().sum(), leaves)
        for a, b in zip(g, want, strict=True):
            torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_vmap_and_jacrev_in_eval(cell, scheme):
    """``vmap`` over a stack of batches equals a Python loop over them; ``jacrev`` equals
    ``torch.autograd.functional.jacobian`` (eval mode: deterministic)."""
    m = _make(cell, scheme, layers=2, dtype=F64).eval()
    xs = torch.randn(3, 4, 2, 3, dtype=F64)
    torch.testing.assert_close(vmap(lambda x: m(x)[0])(xs), torch.stack([m(x)[0] for x in xs]))
    j = jacrev(lambda x: m(x)[0])(xs[0])
    want = torch.autograd.functional.jacobian(lambda x: m(x)[0], xs[0])
    torch.testing.assert_close(j, want)
    torch.testing.assert_close(jacfwd(lambda x: m(x)[0])(xs[0]), want)  # forward mode


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("scheme", ["untied", "zoneout", "semeniuta"])
def test_forward_mode_ad_with_dual_tensors(cell, scheme):
    """``torch.autograd.forward_ad`` (dual tensors, no torch.func) in training: the tangent
    equals the Jacobian-vector product from reverse mode, masks fixed by a seed."""
    import torch.autograd.forward_ad as fwAD

    m = _make(cell, scheme, layers=2, dtype=F64).train()
    x, v = torch.randn(4, 2, 3, dtype=F64), torch.randn(4, 2, 3, dtype=F64)
    with fwAD.dual_level():
        torch.manual_seed(0)
        tangent = fwAD.unpack_dual(m(fwAD.make_dual(x, v))[0]).tangent

    def f(x):
        torch.manual_seed(0)
        return m(x)[0]

    _, want = torch.autograd.functional.jvp(f, x, v)
    torch.testing.assert_close(tangent, want)


def test_vmap_in_training_follows_vmaps_randomness_policy():
    """In training, vmap's randomness policy applies: ``"same"`` gives every vmapped batch
    the masks of an unbatched call with the same seed; the default ``"error"`` refuses, as
    torch does for any random op. (``"different"`` is refused by functorch: the masks
    are drawn from one seed per call.)"""
    m = _make("lstm", "variational", dtype=F64).train()
    x = torch.randn(3, 4, 2, 3, dtype=F64)
    torch.manual_seed(0)
    out = vmap(lambda x: m(x)[0], randomness="same")(x)
    for k in range(3):
        torch.manual_seed(0)
        torch.testing.assert_close(out[k], m(x[k])[0])
    with pytest.raises(RuntimeError, match="random"):
        vmap(lambda x: m(x)[0])(x)
