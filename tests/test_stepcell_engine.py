"""Step cells run the layers' engine pieces: masks drawn by ForwardMasks (one step), the step
math the cell's own ``step_forward`` (out of place), differentiable to any order."""

import dataclasses

import pytest
import torch

from rnndrop.config import RecurrentDropout as RD
from rnndrop.kernels import LayerMasks
from rnndrop.nn import GRUCell, LSTMCell, RNNCell

F64 = torch.float64
I, H, B = 3, 4, 2
CELLS = {"lstm": LSTMCell, "gru": GRUCell, "rnn": RNNCell}
EVERYTHING = {
    "lstm": RD(input=0.3, recurrent=0.3, candidate=0.3, weight_hh=0.3, zoneout_hidden=0.3,
               zoneout_cell=0.3, tied=False),
    "gru": RD(input=0.3, recurrent=0.3, candidate=0.3, weight_hh=0.3, zoneout_hidden=0.3,
              tied=False),
    "rnn": RD(input=0.3, recurrent=0.3, weight_hh=0.3, zoneout_hidden=0.3, tied=False),
}  # fmt: skip


def state(cell, grad=False):
    def t():
        return torch.randn(B, H, dtype=F64, requires_grad=grad)

    return (t(), t()) if cell.cell.has_cell else t()


def fixed_masks(cell):
    """Every mask of one step, zoneout included, so that calls are deterministic."""
    masks = cell.sample_masks(B)
    masks.zoneout_hidden = (torch.rand(B, H, dtype=F64) < 0.3).to(F64)
    if cell.cell.has_cell:
        masks.zoneout_cell = (torch.rand(B, H, dtype=F64) < 0.3).to(F64)
    return masks


@pytest.mark.parametrize("kind", CELLS)
def test_the_step_is_the_cells_step_forward_with_the_recorded_masks(kind):
    """A spy on the cell's step_forward: called once per call, out of place (out=None), with
    the step's LayerMasks holding exactly the masks the call recorded; its state is the
    call's result."""
    torch.manual_seed(0)
    cell = CELLS[kind](I, H, dropout=EVERYTHING[kind]).to(F64)
    cell.record_masks = True
    seen = []
    real = cell.cell.step_forward

    def spy(a, rec, prev, m, out=None):
        new = real(a, rec, prev, m, out)
        seen.append((m, out, new))
        return new

    cell.cell = dataclasses.replace(cell.cell, step_forward=spy)
    hx = state(cell)
    with cell.sequence():
        res = cell(torch.randn(B, I, dtype=F64), hx)
    assert len(seen) == 1
    m, out, new = seen[0]
    assert out is None and isinstance(m, LayerMasks)
    h = res[0] if cell.cell.has_cell else res
    assert h is new.h
    rec = cell.last_masks
    assert torch.equal(m.zoneout_h, rec["zoneout_hidden/l0"][0])
    assert torch.equal(m.recurrent, rec["recurrent/l0"][0])  # (Gr, B, H): untied, per gate
    assert m.recurrent.shape == (cell.cell.gates, B, H)
    if kind != "rnn":
        assert torch.equal(m.candidate, rec["candidate/l0"][0])
    if kind == "lstm":
        assert torch.equal(m.zoneout_c, rec["zoneout_cell/l0"][0])
    else:
        assert m.zoneout_c is None


@pytest.mark.parametrize("kind", CELLS)
def test_double_backward_through_a_step_with_every_mask(kind):
    """Second derivatives of one masked step (gradgradcheck, float64): the step is autograd's
    to differentiate, weight drop included."""
    torch.manual_seed(1)
    cell = CELLS[kind](I, H, dropout=EVERYTHING[kind]).to(F64)
    masks = fixed_masks(cell)
    x = torch.randn(B, I, dtype=F64, requires_grad=True)
    hx = state(cell, grad=True)
    leaves = (x, *(hx if isinstance(hx, tuple) else (hx,)))
    names = [n for n, _ in cell.named_parameters()]

    def f(x, *rest):
        s, params = rest[: len(leaves) - 1], rest[len(leaves) - 1 :]
        out = torch.func.functional_call(cell, dict(zip(names, params, strict=True)),
                                         (x, s if len(s) == 2 else s[0]),
                                         {"masks": masks})  # fmt: skip
        return out if isinstance(out, tuple) else (out,)

    params = tuple(p.detach().requires_grad_() for p in cell.parameters())
    assert torch.autograd.gradgradcheck(f, (*leaves, *params))


@pytest.mark.parametrize("kind", CELLS)
def test_torch_func_grad_of_a_masked_step_equals_autograd(kind):
    torch.manual_seed(2)
    cell = CELLS[kind](I, H, dropout=EVERYTHING[kind]).to(F64)
    masks = fixed_masks(cell)
    x = torch.randn(B, I, dtype=F64)
    hx = state(cell)

    def loss(x):
        res = cell(x, hx, masks=masks)
        return (res[0] if isinstance(res, tuple) else res).sin().sum()

    xg = x.clone().requires_grad_()
    (want,) = torch.autograd.grad(loss(xg), xg)
    torch.testing.assert_close(torch.func.grad(loss)(x), want, rtol=1e-12, atol=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("kind", CELLS)
@pytest.mark.parametrize("mode", ["kept_masks", "draws", "eval_classic"])
def test_a_compiled_step_is_one_graph(kind, mode):
    """torch.compile: a step with its sequence's masks and a classic-scaling eval step
    compile to one graph with no break and equal eager; a step that draws breaks once (its
    draws are one opaque call), not once per mask."""
    import warnings

    cfg = EVERYTHING[kind]
    if mode == "eval_classic":
        cfg = cfg.replace(scaling="classic")
    cell = CELLS[kind](I, H, dropout=cfg).to(F64)
    cell.train(mode != "eval_classic")
    masks = fixed_masks(cell) if mode == "kept_masks" else None
    x = torch.randn(B, I, dtype=F64)
    hx = None if mode == "draws" else state(cell)  # hx=None: a sequence of its own, drawn

    def f(x, hx):
        return cell(x, hx, masks=masks)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch._dynamo.reset()
        explained = torch._dynamo.explain(f)(x, hx)
    # a call that draws: its draws are one opaque call (not one break per mask); the zero
    # state made before it is the only other graph
    most = 1 if mode == "draws" else 0
    assert explained.graph_break_count <= most, explained.break_reasons
    assert explained.graph_count <= most + 1
    if mode != "draws":
        got, want = torch.compile(f, backend="eager")(x, hx), f(x, hx)
        for a, b in zip(got if isinstance(got, tuple) else (got,),
                        want if isinstance(want, tuple) else (want,), strict=True):  # fmt: skip
            torch.testing.assert_close(a, b)
