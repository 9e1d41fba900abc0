"""The ``cpp`` loop backend: a compiled time loop for CPU float32/float64 (``loop.cpp``).

One call does the input projection of all steps, the time loop with one fused pointwise
pass per step (GEMMs in oneDNN or ATen), and in backward the whole backprop through time
with every weight gradient as one GEMM over all ``T·B`` rows. Built on first use
(:mod:`rnndrop.kernels.cpp.build`). The kernel's functions take the fields of
:class:`~rnndrop.kernels.contract.LayerInputs` positionally; this adapter is the only
caller, so the positional order lives here and in ``loop.cpp`` and nowhere else. Every cell
has the same two functions, ``{cell}_forward`` and ``{cell}_backward`` (a cell without a
cell state takes None for ``c0`` and returns None for ``dc0``), so this adapter does not name
cells. Nor does it name the masks that act inside the step (``LayerMasks.step_names()``):
they pass as one list in that order, which the build also gives the kernel
(``step_masks.h``), and their gradients come back as one list in the same order.
"""

from __future__ import annotations

import torch

from ..contract import Grads, LayerInputs, LayerMasks, Saved
from ..python import loop_mask_grads
from . import build

__all__ = ["CppBackend", "build"]


_STEP = LayerMasks.step_names()  # the kernel's `steps` list, in this order


def _steps(m: LayerMasks) -> list:
    """The step masks as the kernel takes them: one list (None where absent)."""
    return [getattr(m, n) for n in _STEP]


def _packed(inp: LayerInputs):
    """A cell's extra parameters as the kernel takes them: one row (None without)."""
    return torch.cat(inp.extra) if inp.extra else None


class CppBackend:
    """Adapter from the contract to the compiled functions ``{cell}_forward/_backward``."""

    name = "cpp"

    def unavailable(self, inp: LayerInputs) -> str | None:
        x = inp.x
        if x.device.type != "cpu":
            return f"it runs on CPU tensors and the input is on {x.device}"
        if x.dtype not in (torch.float32, torch.float64):
            return f"it runs float32 and float64 and the input is {x.dtype}"
        if x.numel() == 0:  # only a cell without a fused op sends an empty batch here
            return "the input is empty"
        why = build.why_unavailable()
        if why is not None:
            return why
        if not hasattr(build.load(), f"{inp.cell.name}_forward"):
            return f"the compiled kernel has no {inp.cell.name} loop"
        return None

    def forward(self, inp: LayerInputs) -> Saved:
        # one signature for every cell: loop.cpp's layer_forward<Cell> (c0, b_h None where the
        # cell has none; a step mask the cell does not read is ignored); it returns Saved's
        # fields in order
        ext, m = build.load(), inp.masks
        fwd = getattr(ext, f"{inp.cell.name}_forward")
        return Saved(*fwd(
            inp.x, inp.w_ih, inp.b_x, m.input, inp.w_hh, inp.b_h, inp.h0, inp.c0, m.recurrent,
            _steps(m), inp.reverse, _packed(inp),
        ))  # fmt: skip

    def backward(
        self, inp: LayerInputs, s: Saved, dh_seq, dc_last, need_x, need_w, need_masks=()
    ) -> Grads:
        ext, m = build.load(), inp.masks
        mg = any(need_masks)
        bwd = getattr(ext, f"{inp.cell.name}_backward")
        dgx, dx, dw_ih, db_x, dw_hh, db_h, dh0, dc0, drec, *dsteps, dex = bwd(
            dh_seq, dc_last, inp.x, inp.w_ih, inp.b_x is not None, m.input, inp.w_hh,
            inp.b_h is not None, inp.h0, inp.c0, s.acts, s.h_seq, s.c_seq, s.ct_seq, s.hm_seq,
            s.hn_seq, m.recurrent, _steps(m), inp.reverse, need_x, need_w, mg, _packed(inp),
            s.extra,
        )  # fmt: skip
        g = Grads(dgx if inp.w_ih is None else dx, dw_ih, db_x, dw_hh, db_h, dh0, dc0)
        if inp.extra:  # the packed gradient, split back into the cell's parameters
            g.dextra = dex.split([e.numel() for e in inp.extra])
        if mg:  # loop.cpp returns the per-step gradients of the masks it applies in the loop
            per_step = LayerMasks(recurrent=drec, **dict(zip(_STEP, dsteps, strict=True)))
            g.dmasks = loop_mask_grads(inp, dgx, need_masks, per_step)
        return g
