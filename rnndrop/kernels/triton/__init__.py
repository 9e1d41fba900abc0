"""The ``triton`` loop backend: GPU kernels for every loop-path site of every cell in CELLS.

For the LSTM, the GRU, the Elman RNN (tanh, relu) and, on the step path only, the LayerNorm
LSTM, every loop-path site of the contract: tied and untied recurrent masks (per sample,
shared over time or per step), candidate masks, cell masks and zoneout on ``c`` (the
LSTMs), zoneout on ``h``, untied input masks (applied by
:func:`~rnndrop.kernels.python.project` before the loop), both directions, with or without
biases and the input projection.

Two paths (``$RNNDROP_TRITON_PATH``, :func:`triton_path`):

- ``loop``: the whole time loop of a layer in one launch (:mod:`._kernels` ``loop_fwd`` /
  ``loop_bwd``). Each program owns a block of the batch and keeps its state on chip for
  every step. Float32, hidden size up to :data:`MAX_H`, and the shared memory a block may use.
- ``step``: for everything else (larger hidden sizes, float16/bfloat16 under autocast, GPUs
  with less shared memory): the reference loop of :class:`~rnndrop.kernels.python.PythonBackend`
  with a cuBLAS GEMM per step and the step's pointwise math in one fused kernel
  (``step_fwd`` / ``step_bwd``). With ``RNNDROP_CUDA_GRAPHS=1`` the loop of
  forward and of backward is captured into CUDA graphs, cached per call signature, and
  replayed (one launch for the whole loop's kernels; opt-in until it is measured on a GPU).

``auto`` (the default) takes ``loop`` where it fits, else ``step``.

Each kernel is written once (:mod:`._kernels`); a cell is its pointwise forward and backward
in its own file (``cell_<name>.py``) and one entry in :data:`CELLS`. :func:`_kernel`
instantiates a kernel per cell (``lstm_loop_fwd``, ``gru_step_bwd``, ...), as FlashRNN
chooses a cell's pointwise code at build time.

Where it runs: on CUDA tensors (compiled), or on CPU tensors in Triton's interpreter when
``TRITON_INTERPRET=1`` is set (slow: for the parity tests). This module imports triton only when
the backend is asked whether it can run, so ``import rnndrop`` never needs it (torch's
dynamo imports an installed triton early on its own).

What the kernels do and what the adapter does: the kernels run the time loop (recurrent
GEMMs, masks, gate math) or one step of it and, in backward, write the gate gradients; the
input projection before the loop and every weight and input gradient after it are plain torch
GEMMs over all ``T·B`` rows, the very functions of the ``python`` reference.
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import NamedTuple

import torch
from torch import Tensor

from ..contract import Grads, LayerInputs, LayerMasks, Saved, State
from ..python import PythonBackend, mask_grad_buffers, project

__all__ = ["MAX_H", "TritonBackend", "interpreting"]

# One launch keeps a (BB, BH) state on chip and re-reads whole (BH, BH) W_hh gate tiles each
# step. Compiled offline here for sm_90 (triton 3.8, num_warps 4, num_stages 1; no GPU run
# yet) with every site on, tied and untied, the kernels' shared memory per block was at most:
#   BH 16: 6 KiB; 32: 18 KiB; 64: 60 KiB; 128: 216 KiB (lstm_bwd, gru_fwd) - within Hopper's
#   227 KiB, beyond an A100's 163 KiB; BH 256 would need K-tiled dots, so larger layers
#   take the step path (a cuBLAS GEMM per step, _TritonSteps). With the default num_stages 3
#   the pipeliner multi-buffers the W tiles across time steps (224 KiB at BH 64, ~700 KiB at
#   BH 128): hence num_stages=1.
# unavailable() refuses a CUDA device whose opt-in shared memory per block is below the table
# (16 and 32 rounded up to the 64 entry, a margin for the variants not compiled here).
# The kernels written once per loop (issue 21) need less (BH 128: at most 96 KiB, lstm_bwd;
# docs/engine.md); the table keeps the old bound until a GPU run has checked the new one.
MAX_H = 128
_SHARED_BYTES = {16: 61440, 32: 61440, 64: 61440, 128: 221184}  # by BH, measured for sm_90
NUM_STAGES = 1
BLOCK_B = 16  # batch rows per program; tl.dot wants every dimension ≥ 16 on a GPU
_INT32 = 2**31 - 1  # the kernels index with int32 offsets

_NO_TRITON = None  # why triton cannot be imported ("" once it imported), filled lazily


class CellKernels(NamedTuple):
    """A cell's pointwise math for the kernels: what every kernel of _kernels.py calls as
    cell_forward / cell_backward."""

    module: str  # its file in this package
    forward: str
    backward: str
    rows: bool = False  # reduces over a batch row: the step kernels' row layout (ROWS), its
    # own parameters and saved row; the one-launch kernels do not run it


# One line per cell.
CELLS = {
    "lstm": CellKernels("cell_lstm", "forward", "backward"),
    "gru": CellKernels("cell_gru", "forward", "backward"),
    "rnn_tanh": CellKernels("cell_rnn", "tanh_forward", "tanh_backward"),
    "rnn_relu": CellKernels("cell_rnn", "relu_forward", "relu_backward"),
    "layernorm_lstm": CellKernels("cell_layernorm_lstm", "forward", "backward", rows=True),
}
KERNELS = ("loop_fwd", "loop_bwd", "step_fwd", "step_bwd")  # the loops of _kernels.py
_INSTANCES: dict[tuple[str, bool], object] = {}  # (<cell>_<loop>, interpret) -> kernel
_SPACES: dict[tuple[str, bool], dict] = {}


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


def cell_constants(cell) -> dict:
    """The constexprs every kernel takes from the cell: gates, cell state, split product."""
    return dict(G=cell.gates, HAS_C=cell.has_cell, SPLIT=cell.split_recurrent)


def row_cell(name: str) -> bool:
    """Whether the cell's step kernels run in the row layout (``CellKernels.rows``)."""
    return getattr(CELLS[name], "rows", False)


def _kernel(name: str, interpret: bool):
    """The kernel ``name`` = ``<cell>_<loop>`` (``lstm_loop_fwd``, ``gru_step_bwd``, ...),
    wrapped for the interpreter or the compiler."""
    key = (name, interpret)
    if key not in _INSTANCES:
        loop = next((k for k in KERNELS if name.endswith("_" + k)), None)
        cell = name[: -len(loop) - 1] if loop else None
        if cell not in CELLS:
            raise KeyError(f"no triton kernel {name!r}: <cell>_<loop> with a cell of "
                           f"{sorted(CELLS)} and a loop of {list(KERNELS)}")  # fmt: skip
        _INSTANCES[key] = _namespace(cell, interpret)[loop]
    return _INSTANCES[key]


def _namespace(cell: str, interpret: bool) -> dict:
    """The globals of one cell's kernels in one mode (the template instantiated).

    ``@triton.jit`` chooses between compiler and interpreter when it runs, from
    ``TRITON_INTERPRET`` at that moment (not at ``import triton`` and not at launch), and a
    kernel may only call functions jitted in its own mode. The functions of ``_kernels.py``
    and of the cell's file are therefore kept undecorated; here each is copied into one
    namespace with ``cell_forward`` / ``cell_backward`` bound to the cell's pointwise math,
    and wrapped in that namespace (a kernel's calls resolve there), once per cell and mode.
    """
    key = (cell, interpret)
    if key not in _SPACES:
        import importlib
        import inspect
        from types import FunctionType

        from . import _kernels

        module, fwd, bwd = CELLS[cell][:3]
        cell_module = importlib.import_module(f"{__name__}.{module}")
        if interpret:
            from triton.runtime.interpreter import InterpretedFunction as wrap
        else:
            from triton.runtime.jit import JITFunction as wrap
        own = (_kernels.__name__, cell_module.__name__)
        shared = {*vars(_kernels), "cell_forward", "cell_backward"}
        clash = sorted(n for n, f in vars(cell_module).items() if n in shared
                       and inspect.isfunction(f) and f.__module__ == own[1])  # fmt: skip
        if clash:  # one namespace: a cell's function would replace the loops' own
            raise ValueError(f"{cell_module.__name__} defines {clash}, names _kernels.py or the "
                             "template uses; rename them")  # fmt: skip
        ns = {**vars(_kernels), **vars(cell_module)}
        for name, fn in list(ns.items()):
            # the template's and the cell's functions, and helpers a cell imports from
            # another cell's file (the LayerNorm LSTM's gates are the LSTM's)
            if inspect.isfunction(fn) and fn.__module__.startswith(f"{__name__}."):
                copy = FunctionType(fn.__code__, ns, fn.__name__, fn.__defaults__)
                copy.__annotations__ = dict(fn.__annotations__)  # tl.constexpr parameters
                copy.__module__, copy.__qualname__ = fn.__module__, f"{cell}_{fn.__qualname__}"
                copy.__doc__ = fn.__doc__
                ns[name] = wrap(copy)
        ns["cell_forward"], ns["cell_backward"] = ns[fwd], ns[bwd]
        _SPACES[key] = ns
    return _SPACES[key]


def _block_h(H: int) -> int:
    return max(16, 1 << (H - 1).bit_length())


def _or(t: Tensor | None, dummy: Tensor) -> Tensor:
    """``t``, or a tensor to pass where a kernel never reads the pointer."""
    return dummy if t is None else t


_STEP = LayerMasks.step_names()  # the kernels' step-mask group, in this order
_READS: dict[str, tuple[bool, ...]] = {}


def step_reads(cell: str) -> tuple[bool, ...]:
    """Per step mask (``LayerMasks.step_names()``), whether the cell's kernels apply it:
    the loops' own (``_kernels.LOOP_MASKS``: zoneout) or one its file names in
    ``STEP_MASKS`` (as a C++ cell's ``kStepMasks``)."""
    if cell not in _READS:
        import importlib

        from . import _kernels

        names = importlib.import_module(f"{__name__}.{CELLS[cell][0]}").STEP_MASKS
        unknown = sorted(set(names) - set(_STEP))
        if unknown:
            raise ValueError(f"{CELLS[cell][0]}.STEP_MASKS names {unknown}, which are not step "
                             f"fields of LayerMasks ({list(_STEP)})")  # fmt: skip
        _READS[cell] = tuple(n in names or n in _kernels.LOOP_MASKS for n in _STEP)
    return _READS[cell]


def _step_masks(cell: str, m: LayerMasks, shape: tuple[int, ...]) -> tuple:
    """The step masks as the kernels take them (``SM``, then one stride tuple per dim of
    ``shape``): each mask broadcast to ``shape``, None (strides 0) where it is absent or the
    cell does not read it (an absent mask then costs the kernel nothing: Triton
    specialises None)."""
    ptrs, strides = [], []
    for name, read in zip(_STEP, step_reads(cell), strict=True):
        t = getattr(m, name) if read else None
        e = None if t is None else t.expand(shape)
        ptrs.append(e)
        strides.append((0,) * len(shape) if e is None else e.stride())
    return (tuple(ptrs), *zip(*strides, strict=True))


def _applied(cell: str, need_masks: tuple[bool, ...]) -> tuple[bool, ...]:
    """``need_masks`` without the step masks the cell's kernels do not apply: those get no
    gradient (None), as in the cpp loop, rather than a buffer nothing writes."""
    reads = dict(zip(_STEP, step_reads(cell), strict=True))
    return tuple(need and reads.get(name, True)
                 for name, need in zip(LayerMasks.names(), need_masks, strict=False))  # fmt: skip


def _mask_grads(ptrs: tuple, dm: LayerMasks | None) -> tuple:
    """``DSM``: the buffers of the step masks' gradients, None where not asked for (or the
    mask is absent, or not read)."""
    return tuple(None if dm is None or p is None else getattr(dm, n)
                 for n, p in zip(_STEP, ptrs, strict=True))  # fmt: skip


#: The step-mask group's parameters in the kernels (``_kernels.py``): pointers, strides.
_GROUP_PARAMS = {"SM": "*fp32", "DSM": "*fp32", "sm_t": "i32", "sm_b": "i32", "sm_h": "i32"}


def compile_spec(cell, loop: str) -> tuple[object, dict, dict]:
    """``(kernel, signature, constexprs)`` of the cell's kernel ``loop`` (one of
    :data:`KERNELS`) with every site of the cell on, compiled (not interpreted), for
    ``triton.compile(ASTSource(kernel, signature, constexprs), target=...)`` without a GPU
    (tests/test_triton.py, scripts/triton_compile_time.py): untied recurrent masks, every
    step mask the cell's kernels apply (:func:`step_reads`; zoneout on ``c`` with a cell
    state), their gradients and the recurrent mask's (concrete dropout), the output's
    gradient, ``b_h`` where the cell splits the recurrent product, the next step's masked
    ``h``, reverse; ``BB = BH = 16``, ``BLOCK = STEP_BLOCK`` (a row cell's: rows up to that
    size). Pointers float32, sizes and strides int32."""
    import inspect

    fn = _kernel(f"{cell.name}_{loop}", False)
    on = tuple(read and (name != "zoneout_c" or cell.has_cell)
               for name, read in zip(_STEP, step_reads(cell.name), strict=True))  # fmt: skip
    fixed = dict(GR=cell.gates, REVERSE=True, BB=16, BH=16, ROWS=row_cell(cell.name),
                 BLOCK=STEP_BLOCK, HAS_BH=cell.split_recurrent, **cell_constants(cell))  # fmt: skip
    sig, consts = {}, {}
    for k, name in enumerate(inspect.signature(fn.fn).parameters):
        if name in _GROUP_PARAMS:
            pointer = _GROUP_PARAMS[name].startswith("*")
            sig[name] = tuple(_GROUP_PARAMS[name] if o or not pointer else "constexpr"
                              for o in on)  # fmt: skip
            consts.update({(k, j): None for j, o in enumerate(on) if pointer and not o})
        elif name in fixed or name.startswith("HAS_") or name == "MG":
            sig[name] = "constexpr"
            consts[name] = fixed.get(name, True)  # every other flag on
        else:
            sig[name] = "i32" if not name.isupper() or name in ("T", "B", "H", "N") else "*fp32"
    return fn, sig, consts


def _mask_args(m: Tensor | None, shape: tuple[int, ...], dummy: Tensor) -> tuple:
    """(pointer, strides...) of a mask broadcast to ``shape``: stride 0 where it is shared."""
    if m is None:
        return (dummy, *[0] * len(shape))
    e = m.expand(shape)
    return (e, *e.stride())


class TritonBackend:
    """Adapter from the contract to the kernels ``<cell>_loop_fwd`` / ``<cell>_loop_bwd``."""

    name = "triton"

    def unavailable(self, inp: LayerInputs) -> str | None:
        x = inp.x
        if inp.cell.name not in CELLS:  # first: the one reason no setting changes
            return f"it has no {inp.cell.name} kernel (python or cpp run this cell)"
        if x.device.type == "cpu":
            if not interpreting():
                return ("the triton backend runs on CUDA tensors; set TRITON_INTERPRET=1 to run "
                        "it on CPU in Triton's interpreter (slow, for tests)")  # fmt: skip
        elif x.device.type != "cuda":
            return f"the triton backend runs on CUDA tensors and the input is on {x.device}"
        why = _triton_missing()
        if why is not None:
            return why
        if x.dtype not in (*HALF, torch.float32):
            return (f"its kernels run float32, float16 and bfloat16 only and the input is "
                    f"{x.dtype}")  # fmt: skip
        if not inp.cell.has_cell and inp.masks.zoneout_c is not None:
            return f"a {inp.cell.name.upper()} has no cell state to zone out"
        if x.shape[0] == 0:
            return "the sequence is empty"
        B, H = inp.h0.shape
        if B == 0:  # only a cell without a fused op sends one; python runs it
            return "the batch is empty"
        width = inp.cell.saved_width(H) if inp.cell.saved_width is not None else 0
        if B * max(inp.cell.gates * H, width, sum(e.numel() for e in inp.extra)) > _INT32:
            return "the tensors are too large for the kernels' 32-bit offsets"
        if triton_path() == "loop":
            return self._loop_unfit(inp)
        return None

    @staticmethod
    def _loop_unfit(inp: LayerInputs) -> str | None:
        """Why the one-launch kernel cannot hold this layer (None: it can)."""
        x = inp.x
        T, B = x.shape[:2]
        G = inp.cell.gates
        H = inp.w_hh.shape[1]
        if row_cell(inp.cell.name):
            return (f"its one-launch kernel has no {inp.cell.name} cell (its step path runs "
                    "it)")  # fmt: skip
        if x.dtype != torch.float32:
            return f"its one-launch kernel runs float32 only and the input is {x.dtype}"
        if H > MAX_H:
            return (f"its one-launch kernel holds hidden sizes up to {MAX_H} and this layer has "
                    f"{H}")  # fmt: skip
        if max(T * B * G * H, G * H * H, max(inp.masks.recurrent.shape[1], 1) * T * B * H
               if inp.masks.recurrent is not None else 0) > _INT32:  # fmt: skip
            return "the tensors are too large for the one-launch kernel's 32-bit offsets"
        if x.device.type == "cuda":
            need = _SHARED_BYTES[_block_h(H)]
            have = torch.cuda.get_device_properties(x.device).shared_memory_per_block_optin
            if have < need:
                return (
                    f"its one-launch kernel needs about {need // 1024} KiB of shared memory "
                    f"per block at hidden size {H} and {x.device} has {have // 1024} KiB"
                )
        return None

    def _steps(self, inp: LayerInputs) -> bool:
        """Whether this layer runs on the step path (see :func:`triton_path`)."""
        path = triton_path()
        return path == "step" or (path == "auto" and self._loop_unfit(inp) is not None)

    def forward(self, inp: LayerInputs) -> Saved:
        if self._steps(inp):
            return _STEPS.forward(inp)
        cell, m, x = inp.cell, inp.masks, inp.x
        T, B = x.shape[:2]
        H = inp.w_hh.shape[1]
        acts = x.clone() if inp.w_ih is None else project(x, inp.w_ih, inp.b_x, m.input)
        acts = acts.contiguous()
        new = x.new_empty
        h_seq = new(T, B, H)
        c_seq = new(T, B, H) if cell.has_cell else None
        ct_seq = new(T, B, H) if m.zoneout_c is not None else None
        Gr = m.recurrent.shape[1] if m.recurrent is not None else 1
        hm_seq = new(Gr, T, B, H) if m.recurrent is not None else None
        aux_seq = new(T, B, H) if cell.split_recurrent else None
        rm = _mask_args(m.recurrent, (T, Gr, B, H), acts)
        sm = _step_masks(cell.name, m, (T, B, H))
        grid = (triton_cdiv(B, BLOCK_B),)
        _kernel(f"{cell.name}_loop_fwd", interpreting())[grid](
            acts, inp.w_hh, _or(inp.b_h, acts), inp.h0, _or(inp.c0, acts), rm[0], sm[0],
            h_seq, _or(c_seq, acts), _or(ct_seq, acts), _or(hm_seq, acts), _or(aux_seq, acts),
            T, B, H, *rm[1:], *sm[1:], HAS_BH=inp.b_h is not None,
            HAS_RM=m.recurrent is not None, GR=Gr, REVERSE=bool(inp.reverse), BB=BLOCK_B,
            BH=_block_h(H), num_stages=NUM_STAGES, **cell_constants(cell),
        )  # fmt: skip
        return Saved(acts, h_seq, c_seq, ct_seq, hm_seq, aux_seq)

    def backward(
        self, inp: LayerInputs, s: Saved, dh_seq, dc_last, need_x, need_w, need_masks=()
    ) -> Grads:
        need_masks = _applied(inp.cell.name, need_masks)
        if self._steps(inp):
            return _STEPS.backward(inp, s, dh_seq, dc_last, need_x, need_w, need_masks)
        cell, m = inp.cell, inp.masks
        T, B = s.acts.shape[:2]
        H = inp.w_hh.shape[1]
        # per-step gradients of the masks applied in the loop (concrete dropout)
        inner = mask_grad_buffers(inp, T, need_masks, s.acts)
        Gr = m.recurrent.shape[1] if m.recurrent is not None else 1
        dummy = s.acts
        rm = _mask_args(m.recurrent, (T, Gr, B, H), dummy)
        sm = _step_masks(cell.name, m, (T, B, H))
        dh0 = torch.empty_like(inp.h0)
        dc0 = torch.empty_like(inp.c0) if cell.has_cell else None
        dcl = None
        if cell.has_cell:
            dcl = torch.zeros_like(inp.c0) if dc_last is None else dc_last.contiguous()
        dgx = torch.empty_like(s.acts)
        dgh = torch.empty_like(s.acts) if cell.split_recurrent else dgx
        grid = (triton_cdiv(B, BLOCK_B),)
        dh = None if dh_seq is None else dh_seq.contiguous()
        _kernel(f"{cell.name}_loop_bwd", interpreting())[grid](
            s.acts, inp.w_hh, inp.h0, _or(inp.c0, dummy), s.h_seq, _or(s.c_seq, dummy),
            _or(s.ct_seq, dummy), _or(s.hn_seq, dummy), rm[0], sm[0], _or(dh, dummy),
            _or(dcl, dummy), dgx, dgh, dh0, _or(dc0, dummy), _or(inner.recurrent, dummy),
            _mask_grads(sm[0], inner), T, B, H, *rm[1:], *sm[1:],
            HAS_RM=m.recurrent is not None, GR=Gr, HAS_DH=dh_seq is not None,
            REVERSE=bool(inp.reverse), BB=BLOCK_B, BH=_block_h(H), MG=any(need_masks),
            num_stages=NUM_STAGES, **cell_constants(cell),
        )  # fmt: skip
        # weight and input gradients: GEMMs over all T·B rows, exactly the reference's
        return PythonBackend._grads(inp, s, dgx, dgh, dh0, dc0, inner, need_x, need_w,
                                    need_masks)  # fmt: skip


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


PATHS = ("auto", "loop", "step")
HALF = (torch.float16, torch.bfloat16)  # the step path's (autocast's) lower precisions


def triton_path() -> str:
    """``$RNNDROP_TRITON_PATH``: ``auto`` (default), ``loop`` or ``step``.

    ``loop``: the whole time loop in one launch (hidden sizes up to :data:`MAX_H`, and the
    shared memory a block may use on this GPU). ``step``: the host runs the loop, a cuBLAS
    GEMM per step adds the recurrent product and one fused Triton kernel does the step's
    pointwise math. ``auto`` takes ``loop`` where it fits, else ``step``.
    """
    path = os.environ.get("RNNDROP_TRITON_PATH", "auto").strip().lower()
    if path not in PATHS:
        raise ValueError(f"RNNDROP_TRITON_PATH={path!r}: choose one of {list(PATHS)}")
    return path


STEP_BLOCK = 512  # (B, H) elements per program of a step kernel


class _TritonSteps(PythonBackend):
    """The step path: the reference loop of :class:`PythonBackend` (its GEMMs, the masked
    ``h_{t-1}`` and every weight gradient, unchanged), with each step's pointwise math, the
    cells' ``step_forward`` / ``step_backward``, done by one Triton kernel
    (``<cell>_step_fwd`` / ``<cell>_step_bwd``) that writes straight into the output rows."""

    # a cell's own parameters (LayerInputs.extra) reach the kernels packed into one row, as
    # the loop's steps see them: params=(packed,), and in backward dparams=((B, Σ numel),)
    def forward(self, inp: LayerInputs) -> Saved:
        return super().forward(_packed(inp))

    def backward(self, inp: LayerInputs, s: Saved, dh_seq, dc_last, need_x, need_w,
                 need_masks=()) -> Grads:  # fmt: skip
        g = super().backward(_packed(inp), s, dh_seq, dc_last, need_x, need_w, need_masks)
        if inp.extra:  # the packed gradient, split back into the cell's parameters
            g.dextra = tuple(g.dextra[0].split([e.numel() for e in inp.extra]))
        return g

    @staticmethod
    def _step_forward(cell, rec, prev: State, m: LayerMasks, out: Saved, nxt,
                      params=()) -> bool:  # fmt: skip
        a, h, c = out.acts, prev.h, prev.c
        h_out, c_out, ct_out, extra = out.h_seq, out.c_seq, out.ct_seq, out.hn_seq
        B, H = h.shape
        N = B * H
        grid, layout = _step_grid(cell, B, H)
        sm = _step_masks(cell.name, m, (B, H))
        hm_next, rm_next = (a, None) if nxt is None else nxt
        Gr = 1 if nxt is None else hm_next.shape[0]
        rma = _mask_args(rm_next, (Gr, B, H), a)
        step = dict(HAS_NEXT=nxt is not None, GR=Gr, **layout)
        nexts = (hm_next, rma[0])
        next_strides = (0 if nxt is None else hm_next.stride(0), *rma[1:])
        sv = out.extra  # a row cell's saved row (B, W)
        _kernel(f"{cell.name}_step_fwd", interpreting())[grid](
            a, _or(rec, a), h, _or(c, a), sm[0], h_out, _or(c_out, a), _or(ct_out, a),
            _or(extra, a), *nexts, params[0] if params else a, _or(sv, a),
            N, H, *sm[1:], *next_strides, 0 if sv is None else sv.stride(0),
            **step, **cell_constants(cell),
        )  # fmt: skip
        return nxt is not None

    @staticmethod
    def _step_backward(cell, d, dc, prev: State, s: Saved, m: LayerMasks, dgx, dgh,
                       dm: LayerMasks | None, params=(), dparams=()) -> State:  # fmt: skip
        acts, extra, h_prev, c_prev = s.acts, s.hn_seq, prev.h, prev.c
        ct = s.c_seq if s.ct_seq is None else s.ct_seq
        B, H = h_prev.shape
        N = B * H
        grid, layout = _step_grid(cell, B, H)
        carry_in, dh, dh_rec, m_next = d  # the parts of dL/dh_t, summed in the kernel
        Gr = 1 if dh_rec is None else dh_rec.shape[0]
        mna = _mask_args(m_next, (Gr, B, H), acts)
        gather = dict(HAS_DH=dh is not None, HAS_REC=dh_rec is not None,
                      HAS_MN=m_next is not None, GR=Gr)  # fmt: skip
        sm = _step_masks(cell.name, m, (B, H))
        parts = (carry_in.contiguous(), acts if dh is None else dh.contiguous(),
                 acts if dh_rec is None else dh_rec.contiguous(), mna[0])  # fmt: skip
        carry = torch.empty_like(h_prev)
        dc_prev = torch.empty_like(h_prev) if cell.has_cell else None
        sv, dex = s.extra, dparams[0] if dparams else None  # a row cell's saved row, its
        # parameters' gradient accumulator (B, Σ numel)
        _kernel(f"{cell.name}_step_bwd", interpreting())[grid](
            acts, _or(extra, acts), h_prev, _or(c_prev, acts), _or(ct, acts), sm[0], *parts,
            acts if dc is None else dc.contiguous(), dgx, dgh, carry, _or(dc_prev, acts),
            _mask_grads(sm[0], dm), params[0] if params else acts, _or(sv, acts),
            _or(dex, acts), N, H, *sm[1:], *mna[1:], 0 if sv is None else sv.stride(0),
            0 if dex is None else dex.stride(0), **gather, **layout, **cell_constants(cell),
        )  # fmt: skip
        return State(carry, dc_prev)

    # the loop of forward and of backward, each replayed from a CUDA graph when enabled
    def _loop(self, inp: LayerInputs, acts: Tensor) -> Saved:
        if not cuda_graphs(acts):
            return super()._loop(inp, acts)
        m = inp.masks
        n_masks = len(m.tensors())

        def run(acts, w_hh, b_h, h0, c0, *rest):
            static = LayerInputs(inp.cell, acts, None, None, w_hh, b_h, h0, c0,
                                 LayerMasks(*rest[:n_masks]), inp.reverse,
                                 extra=tuple(rest[n_masks:]))  # fmt: skip
            return PythonBackend._loop(self, static, acts)

        key = ("loop", inp.cell.name, inp.reverse)
        return _GRAPHS(key, run, acts, inp.w_hh, inp.b_h, inp.h0, inp.c0, *m.tensors(),
                       *inp.extra)  # fmt: skip

    def _bptt(self, inp, s: Saved, dh_seq, dc_last, need):
        if not cuda_graphs(s.acts):
            return super()._bptt(inp, s, dh_seq, dc_last, need)
        n_masks, n_saved = len(inp.masks.tensors()), len(s.tensors())

        def run(w_hh, h0, c0, dh_seq, dc_last, *rest):
            masks, saved = rest[:n_masks], rest[n_masks : n_masks + n_saved]
            static = LayerInputs(inp.cell, saved[0], None, None, w_hh, None, h0, c0,
                                 LayerMasks(*masks), inp.reverse,
                                 extra=tuple(rest[n_masks + n_saved :]))  # fmt: skip
            return PythonBackend._bptt(self, static, Saved(*saved), dh_seq, dc_last, need)

        key = ("bptt", inp.cell.name, inp.reverse, tuple(need))
        return _GRAPHS(key, run, inp.w_hh, inp.h0, inp.c0, dh_seq, dc_last,
                       *inp.masks.tensors(), *s.tensors(), *inp.extra)  # fmt: skip


def _step_grid(cell, B: int, H: int) -> tuple[tuple[int], dict]:
    """A step kernel's grid and layout constexprs: ``STEP_BLOCK`` elements per program, or
    for a row cell one program per batch row, its lanes the power of two ≥ H."""
    if row_cell(cell.name):
        return (B,), dict(ROWS=True, BLOCK=_block_h(H))
    return (triton_cdiv(B * H, STEP_BLOCK),), dict(ROWS=False, BLOCK=STEP_BLOCK)


def _packed(inp: LayerInputs) -> LayerInputs:
    """``inp`` with its cell's parameters packed into one row (the layout the cell's kernel
    indexes), so the loop hands each step one pointer and one gradient accumulator."""
    return replace(inp, extra=(torch.cat(inp.extra),)) if inp.extra else inp


_STEPS = _TritonSteps()


def cuda_graphs(t: Tensor) -> bool:
    """Whether the step loop replays CUDA graphs: ``RNNDROP_CUDA_GRAPHS=1``, a CUDA tensor,
    and no capture of the caller's under way (a graph inside a graph is not captured)."""
    on = os.environ.get("RNNDROP_CUDA_GRAPHS", "0").strip().lower() in ("1", "true", "on", "yes")
    return on and t.is_cuda and not torch.cuda.is_current_stream_capturing()


def _clone(out):
    if isinstance(out, Tensor):
        return out.clone()
    if isinstance(out, Saved | LayerMasks):
        return type(out)(*[_clone(t) for t in out.tensors()])
    if isinstance(out, tuple):
        return tuple(_clone(t) for t in out)
    return out  # None


class _GraphCache:
    """CUDA graphs of the step loop, one per call signature (the shapes, strides, dtype and
    device of every tensor, which are None, the cell, the direction, the gradients asked for),
    least recently used evicted beyond :attr:`size` (each holds its buffers: about the
    layer's saved activations).

    A signature's first call runs eagerly (it compiles the Triton kernels and warms cuBLAS,
    which must not happen during a capture); its second captures the loop into a graph on
    static copies of the inputs; every call copies its inputs into those, replays, and clones
    the outputs (the next replay overwrites them, and two layers of one shape share a graph).
    """

    size = 16

    def __init__(self) -> None:
        from collections import OrderedDict

        self.entries: OrderedDict = OrderedDict()

    def __call__(self, key, fn, *tensors: Tensor | None):
        key = (key, tuple(None if t is None else (tuple(t.shape), t.stride(), t.dtype, t.device)
                          for t in tensors))  # fmt: skip
        entry = self.entries.get(key)
        if entry is None:
            self.entries[key] = False
            self._trim()
            return fn(*tensors)
        if entry is False:
            static = [None if t is None else t.clone() for t in tensors]
            entry = self.entries[key] = (*self._capture(fn, static), static)
        self.entries.move_to_end(key)
        replay, out, static = entry
        for dst, src in zip(static, tensors, strict=True):
            if src is not None:
                dst.copy_(src)
        replay()
        return _clone(out)

    @staticmethod
    def _capture(fn, static: list):
        """``(replay, outputs)``: ``fn(*static)`` captured into a CUDA graph."""
        device = next(t for t in static if t is not None).device
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up on a side stream, as torch asks
            fn(*static)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            out = fn(*static)
        return graph.replay, out

    def _trim(self) -> None:
        graphs = [k for k, e in self.entries.items() if e]
        for k in graphs[: max(0, len(graphs) - self.size)]:
            del self.entries[k]
        while len(self.entries) > 4 * self.size:
            self.entries.popitem(last=False)


_GRAPHS = _GraphCache()
