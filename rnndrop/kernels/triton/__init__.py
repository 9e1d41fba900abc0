"""The ``triton`` loop backend: the whole time loop of a layer in one Triton launch.

For the LSTM and the GRU, every loop-path site of the contract: tied and untied recurrent
masks (per sample, shared over time or per step), candidate masks, zoneout on ``h`` (and on
``c`` for the LSTM), untied input masks (applied by :func:`~rnndrop.kernels.python.project`
before the loop), both directions, with or without biases and the input projection.
Float32 only, hidden size up to :data:`MAX_H`. Kernels: :mod:`._kernels`.

Where it runs: on CUDA tensors (compiled), or on CPU tensors in Triton's interpreter when
``TRITON_INTERPRET=1`` is set (slow: for the parity tests). This module imports triton only when
the backend is asked whether it can run, so ``import rnndrop`` never needs it (torch's
dynamo imports an installed triton early on its own).

What the kernel does and what the adapter does: the kernel runs the time loop (recurrent
GEMMs, masks, gate math) and, in backward, writes the gate gradients and ``dh0``/``dc0``.
The input projection before the loop and every weight and input gradient after it are
plain torch GEMMs over all ``T·B`` rows, the very functions of the ``python`` reference.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from ..contract import Grads, LayerInputs, Saved
from ..python import PythonBackend, loop_mask_grads, mask_grad_buffers, project

__all__ = ["MAX_H", "TritonBackend", "interpreting"]

# One launch keeps a (BB, BH) state on chip and re-reads whole (BH, BH) W_hh gate tiles each
# step. Compiled offline here for sm_90 (triton 3.8, num_warps 4, num_stages 1; no GPU run
# yet) with every site on, tied and untied, the kernels' shared memory per block was at most:
#   BH 16: 6 KiB; 32: 18 KiB; 64: 60 KiB; 128: 216 KiB (lstm_bwd, gru_fwd) - within Hopper's
#   227 KiB, beyond an A100's 163 KiB; BH 256 would need K-tiled dots (or issue 11's
#   GEMM-per-step path). With the default num_stages 3 the pipeliner multi-buffers the W
#   tiles across time steps (224 KiB at BH 64, ~700 KiB at BH 128): hence num_stages=1.
# unavailable() refuses a CUDA device whose opt-in shared memory per block is below the table
# (16 and 32 rounded up to the 64 entry, a margin for the variants not compiled here).
MAX_H = 128
_SHARED_BYTES = {16: 61440, 32: 61440, 64: 61440, 128: 221184}  # by BH, measured for sm_90
NUM_STAGES = 1
BLOCK_B = 16  # batch rows per program; tl.dot wants every dimension ≥ 16 on a GPU
_INT32 = 2**31 - 1  # the kernels index with int32 offsets

_NO_TRITON = None  # why triton cannot be imported ("" once it imported), filled lazily
_KERNELS: dict[tuple[str, bool], object] = {}


def _triton_missing() -> str | None:
    global _NO_TRITON
    if _NO_TRITON is None:
        try:
            import triton
            import triton.language  # noqa: F401
        except Exception as e:  # ImportError, or a broken install
            _NO_TRITON = (f"triton cannot be imported ({type(e).__name__}: {e}); install the "
                          "extra: pip install 'rnndrop[triton]'")  # fmt: skip
        else:
            _NO_TRITON = ""
    return _NO_TRITON or None


def interpreting() -> bool:
    """Whether ``TRITON_INTERPRET`` asks for Triton's interpreter (read at every call)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def _kernel(name: str, interpret: bool):
    """The kernel ``name`` wrapped for the interpreter or the compiler.

    ``@triton.jit`` chooses between the two when it runs, from ``TRITON_INTERPRET`` at that
    moment (not at ``import triton`` and not at launch). The kernels are therefore kept
    undecorated and wrapped here, once per mode, from the variable's value at the call.
    """
    key = (name, interpret)
    if key not in _KERNELS:
        from . import _kernels

        fn = getattr(_kernels, name)
        if interpret:
            from triton.runtime.interpreter import InterpretedFunction

            _KERNELS[key] = InterpretedFunction(fn)
        else:
            from triton.runtime.jit import JITFunction

            _KERNELS[key] = JITFunction(fn)
    return _KERNELS[key]


def _block_h(H: int) -> int:
    return max(16, 1 << (H - 1).bit_length())


def _mask_args(m: Tensor | None, shape: tuple[int, ...], dummy: Tensor) -> tuple:
    """(pointer, strides...) of a mask broadcast to ``shape``: stride 0 where it is shared."""
    if m is None:
        return (dummy, *[0] * len(shape))
    e = m.expand(shape)
    return (e, *e.stride())


class TritonBackend:
    """Adapter from the contract to the kernels ``{cell}_fwd`` / ``{cell}_bwd``."""

    name = "triton"

    def unavailable(self, inp: LayerInputs) -> str | None:
        x = inp.x
        if x.device.type == "cpu":
            if not interpreting():
                return ("the triton backend runs on CUDA tensors; set TRITON_INTERPRET=1 to run "
                        "it on CPU in Triton's interpreter (slow, for tests)")  # fmt: skip
        elif x.device.type != "cuda":
            return f"the triton backend runs on CUDA tensors and the input is on {x.device}"
        why = _triton_missing()
        if why is not None:
            return why
        if x.dtype != torch.float32:
            return f"its kernels run float32 only and the input is {x.dtype}"
        if inp.cell.name not in ("lstm", "gru"):
            return f"it has no {inp.cell.name} kernel"
        H = inp.w_hh.shape[1]
        if H > MAX_H:
            return (f"its one-launch kernel holds hidden sizes up to {MAX_H} and this layer has "
                    f"{H}")  # fmt: skip
        if inp.cell.name == "gru" and inp.masks.zoneout_c is not None:
            return "a GRU has no cell state to zone out"
        T, B = x.shape[:2]
        G = inp.cell.gates
        if max(T * B * G * H, G * H * H, max(inp.masks.recurrent.shape[1], 1) * T * B * H
               if inp.masks.recurrent is not None else 0) > _INT32:  # fmt: skip
            return "the tensors are too large for the kernels' 32-bit offsets"
        if T == 0:
            return "the sequence is empty"
        if x.device.type == "cuda":
            need = _SHARED_BYTES[_block_h(H)]
            have = torch.cuda.get_device_properties(x.device).shared_memory_per_block_optin
            if have < need:
                return (
                    f"its one-launch kernel needs about {need // 1024} KiB of shared memory "
                    f"per block at hidden size {H} and {x.device} has {have // 1024} KiB"
                )
        return None

    def forward(self, inp: LayerInputs) -> Saved:
        cell, m, x = inp.cell, inp.masks, inp.x
        T, B = x.shape[:2]
        H = inp.w_hh.shape[1]
        acts = x.clone() if inp.w_ih is None else project(x, inp.w_ih, inp.b_x, m.input)
        acts = acts.contiguous()
        new = x.new_empty
        h_seq = new(T, B, H)
        Gr = m.recurrent.shape[1] if m.recurrent is not None else 1
        hm_seq = new(Gr, T, B, H) if m.recurrent is not None else None
        rm = _mask_args(m.recurrent, (T, Gr, B, H), acts)
        cm = _mask_args(m.candidate, (T, B, H), acts)
        zh = _mask_args(m.zoneout_h, (T, B, H), acts)
        grid = (triton_cdiv(B, BLOCK_B),)
        common = dict(HAS_RM=m.recurrent is not None, GR=Gr, HAS_CM=m.candidate is not None,
                      HAS_ZH=m.zoneout_h is not None, REVERSE=bool(inp.reverse), BB=BLOCK_B,
                      BH=_block_h(H), num_stages=NUM_STAGES)  # fmt: skip
        interp = interpreting()
        if cell.name == "lstm":
            c_seq = new(T, B, H)
            ct_seq = new(T, B, H) if m.zoneout_c is not None else None
            zc = _mask_args(m.zoneout_c, (T, B, H), acts)
            _kernel("lstm_fwd", interp)[grid](
                acts, inp.w_hh, inp.h0, inp.c0, rm[0], cm[0], zh[0], zc[0], h_seq, c_seq,
                acts if ct_seq is None else ct_seq, acts if hm_seq is None else hm_seq,
                T, B, H, *rm[1:], *cm[1:], *zh[1:], *zc[1:],
                HAS_ZC=m.zoneout_c is not None, **common,
            )  # fmt: skip
            return Saved(acts, h_seq, c_seq, ct_seq, hm_seq)
        hn_seq = new(T, B, H)
        _kernel("gru_fwd", interp)[grid](
            acts, inp.w_hh, acts if inp.b_h is None else inp.b_h, inp.h0, rm[0], cm[0], zh[0],
            h_seq, hn_seq, acts if hm_seq is None else hm_seq,
            T, B, H, *rm[1:], *cm[1:], *zh[1:],
            HAS_BH=inp.b_h is not None, **common,
        )  # fmt: skip
        return Saved(acts, h_seq, None, None, hm_seq, hn_seq)

    def backward(
        self, inp: LayerInputs, s: Saved, dh_seq, dc_last, need_x, need_w, need_masks=()
    ) -> Grads:
        cell, m = inp.cell, inp.masks
        T, B, GH = s.acts.shape
        H = inp.w_hh.shape[1]
        mg = any(need_masks)
        # per-step gradients of the masks applied in the loop (concrete dropout)
        inner = mask_grad_buffers(inp, T, need_masks, s.acts)
        Gr = m.recurrent.shape[1] if m.recurrent is not None else 1
        dummy = s.acts
        rm = _mask_args(m.recurrent, (T, Gr, B, H), dummy)
        cm = _mask_args(m.candidate, (T, B, H), dummy)
        zh = _mask_args(m.zoneout_h, (T, B, H), dummy)
        dh0 = torch.empty_like(inp.h0)
        dgx = torch.empty_like(s.acts)
        dgh = torch.empty_like(s.acts) if cell.split_recurrent else dgx
        grid = (triton_cdiv(B, BLOCK_B),)
        common = dict(HAS_RM=m.recurrent is not None, GR=Gr, HAS_CM=m.candidate is not None,
                      HAS_ZH=m.zoneout_h is not None, HAS_DH=dh_seq is not None,
                      REVERSE=bool(inp.reverse), BB=BLOCK_B, BH=_block_h(H),
                      MG=mg, num_stages=NUM_STAGES)  # fmt: skip
        dh = dummy if dh_seq is None else dh_seq.contiguous()
        drm, dcm, dzh, dzc = (dummy if b is None else b for b in inner)
        interp = interpreting()
        g = Grads()
        if cell.name == "lstm":
            dc0 = torch.empty_like(inp.c0)
            dcl = torch.zeros_like(inp.c0) if dc_last is None else dc_last.contiguous()
            zc = _mask_args(m.zoneout_c, (T, B, H), dummy)
            _kernel("lstm_bwd", interp)[grid](
                s.acts, inp.w_hh, inp.c0, s.c_seq, dummy if s.ct_seq is None else s.ct_seq,
                rm[0], cm[0], zh[0], zc[0], dh, dcl, dgx, dh0, dc0,
                inp.h0, s.h_seq, drm, dcm, dzh, dzc,
                T, B, H, *rm[1:], *cm[1:], *zh[1:], *zc[1:],
                HAS_ZC=m.zoneout_c is not None, **common,
            )  # fmt: skip
            g.dc0 = dc0
        else:
            _kernel("gru_bwd", interp)[grid](
                s.acts, inp.w_hh, inp.h0, s.h_seq, s.hn_seq, rm[0], cm[0], zh[0], dh,
                dgx, dgh, dh0, drm, dcm, dzh, T, B, H, *rm[1:], *cm[1:], *zh[1:], **common,
            )  # fmt: skip
        g.dh0 = dh0
        # weight and input gradients: GEMMs over all T·B rows, exactly the reference's
        if need_w:
            g.dw_hh = PythonBackend._weight_hh_grad(dgh, inp.h0, s, inp.reverse)
            if inp.b_h is not None:
                g.db_h = dgh.reshape(T * B, GH).sum(0)
        PythonBackend._input_grads(g, inp, dgx, need_x, need_w)
        if mg:
            g.dmasks = loop_mask_grads(inp, dgx, need_masks, inner)
        return g


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)
