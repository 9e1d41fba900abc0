"""The ``cpp`` loop backend: a compiled time loop for CPU float32/float64 (``loop.cpp``).

One call does the input projection of all steps, the time loop with one fused pointwise
pass per step (GEMMs in oneDNN or ATen), and in backward the whole backprop through time
with every weight gradient as one GEMM over all ``T·B`` rows. Built on first use
(:mod:`rnndrop.kernels.cpp.build`). The kernel's functions take the fields of
:class:`~rnndrop.kernels.contract.LayerInputs` positionally; this adapter is the only
caller, so the positional order lives here and in ``loop.cpp`` and nowhere else.
"""

from __future__ import annotations

import torch

from ..contract import Grads, LayerInputs, Saved
from ..python import loop_mask_grads
from . import build

__all__ = ["CppBackend", "build"]


class CppBackend:
    """Adapter from the contract to the compiled functions ``{cell}_forward/_backward``."""

    name = "cpp"

    def unavailable(self, inp: LayerInputs) -> str | None:
        x = inp.x
        if x.device.type != "cpu":
            return f"it runs on CPU tensors and the input is on {x.device}"
        if x.dtype not in (torch.float32, torch.float64):
            return f"it runs float32 and float64 and the input is {x.dtype}"
        why = build.why_unavailable()
        if why is not None:
            return why
        if not hasattr(build.load(), f"{inp.cell.name}_forward"):
            return f"the compiled kernel has no {inp.cell.name} loop"
        return None

    def forward(self, inp: LayerInputs) -> Saved:
        ext, m = build.load(), inp.masks
        if inp.cell.name == "lstm":
            h_seq, c_seq, acts, ct_seq, hm_seq = ext.lstm_forward(
                inp.x, inp.w_ih, inp.b_x, m.input, inp.w_hh, inp.h0, inp.c0, m.recurrent,
                m.candidate, m.zoneout_h, m.zoneout_c, inp.reverse,
            )  # fmt: skip
            return Saved(acts, h_seq, c_seq, ct_seq, hm_seq)
        h_seq, acts, hm_seq, hn_seq = ext.gru_forward(
            inp.x, inp.w_ih, inp.b_x, m.input, inp.w_hh, inp.b_h, inp.h0, m.recurrent,
            m.candidate, m.zoneout_h, inp.reverse,
        )  # fmt: skip
        return Saved(acts, h_seq, None, None, hm_seq, hn_seq)

    def backward(
        self, inp: LayerInputs, s: Saved, dh_seq, dc_last, need_x, need_w, need_masks=()
    ) -> Grads:
        ext, m = build.load(), inp.masks
        mg = any(need_masks)
        if inp.cell.name == "lstm":
            if dc_last is None:
                dc_last = torch.zeros_like(inp.c0)
            dgates, dh0, dc0, dw_hh, dx, dw_ih, db, *inner = ext.lstm_backward(
                dh_seq, dc_last, inp.x, inp.w_ih, inp.b_x is not None, m.input, inp.w_hh,
                inp.h0, inp.c0, s.acts, s.h_seq, s.c_seq, s.ct_seq, s.hm_seq, m.recurrent,
                m.candidate, m.zoneout_h, m.zoneout_c, inp.reverse, need_x, need_w, mg,
            )  # fmt: skip
            g = Grads(dgates if inp.w_ih is None else dx, dw_ih, db, dw_hh, None, dh0, dc0)
            dgx = dgates
        else:
            dgx, dh0, dw_hh, db_h, dx, dw_ih, db_x, *inner = ext.gru_backward(
                dh_seq, inp.x, inp.w_ih, inp.b_x is not None, m.input, inp.w_hh,
                inp.b_h is not None, inp.h0, s.acts, s.h_seq, s.hm_seq, s.hn_seq, m.recurrent,
                m.candidate, m.zoneout_h, inp.reverse, need_x, need_w, mg,
            )  # fmt: skip
            g = Grads(dgx if inp.w_ih is None else dx, dw_ih, db_x, dw_hh, db_h, dh0, None)
            inner.append(None)  # no cell state
        if mg:
            g.dmasks = loop_mask_grads(inp, dgx, need_masks, tuple(inner))
        return g
