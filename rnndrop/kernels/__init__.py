"""Loop backends: one layer and direction of a recurrent cell, forward and backprop through time.

The engine (:class:`rnndrop.nn.rnn.RNNBase`) calls :func:`rnn_layer` for each layer that
needs the time loop; a backend implements the contract of :mod:`rnndrop.kernels.contract`.

Backends, in the order ``auto`` tries them:

========  ======================================================================
``cpp``   compiled C++ time loop, CPU float32/float64 (:mod:`rnndrop.kernels.cpp`)
``triton``  GPU kernels (CUDA float32/float16/bfloat16): the whole loop in one launch where
            it fits (float32, H <= 128), else a cuBLAS GEMM and one fused kernel per step
``python``  the reference loop in PyTorch; runs everywhere
========  ======================================================================

Selection: ``RNNDROP_LOOP=auto|python|cpp|triton`` in the environment, or
:func:`set_loop_backend` / :func:`loop_backend` from Python (which win over the
environment). ``auto`` takes the first backend that can run the tensors at hand. A backend
asked for by name that cannot run raises a ``RuntimeError`` saying why: it never falls
back silently.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import fields

import torch
from torch import Tensor

from .contract import Backend, CellMath, Grads, LayerInputs, LayerMasks, Saved
from .cpp import CppBackend
from .python import PythonBackend
from .reference import reference_layer, wants_reference
from .triton import TritonBackend

__all__ = [
    "BACKENDS",
    "Backend",
    "Grads",
    "LayerInputs",
    "LayerMasks",
    "Saved",
    "compute_dtype",
    "fused_dtype",
    "get_loop_backend",
    "loop_backend",
    "reference_layer",
    "rnn_layer",
    "select_backend",
    "set_loop_backend",
]

BACKENDS: dict[str, Backend] = {b.name: b for b in (CppBackend(), TritonBackend(), PythonBackend())}
_N_MASKS = len(fields(LayerMasks))  # RNNLayer's inputs: the masks, then a cell's extra params
CHOICES = ("auto", *BACKENDS)
_override: list[str] = []  # set_loop_backend / loop_backend, innermost last


def _check_name(name: str, source: str) -> str:
    name = name.strip().lower()
    if name not in CHOICES:
        raise ValueError(f"{source}={name!r}: choose one of {list(CHOICES)}")
    return name


def get_loop_backend() -> str:
    """The requested backend: :func:`set_loop_backend`'s, else ``$RNNDROP_LOOP``, else auto."""
    if _override:
        return _override[-1]
    return _check_name(os.environ.get("RNNDROP_LOOP", "auto"), "RNNDROP_LOOP")


def set_loop_backend(name: str | None) -> None:
    """Pick the loop backend for this process (``None``: back to ``$RNNDROP_LOOP``)."""
    _override.clear()
    if name is not None:
        _override.append(_check_name(name, "loop backend"))


@contextlib.contextmanager
def loop_backend(name: str) -> Iterator[None]:
    """Use a loop backend inside a ``with`` block: ``with loop_backend("python"): ...``."""
    _override.append(_check_name(name, "loop backend"))
    try:
        yield
    finally:
        _override.pop()


def select_backend(inputs: LayerInputs, name: str | None = None) -> Backend:
    """The backend that runs ``inputs``: ``name`` (default: :func:`get_loop_backend`)."""
    name = get_loop_backend() if name is None else _check_name(name, "backend")
    if name == "auto":  # python, last, runs everything
        # Triton on CPU tensors is its interpreter (TRITON_INTERPRET=1): for tests, far slower
        # than the python loop, so only an explicit RNNDROP_LOOP=triton runs it
        return next(b for n, b in BACKENDS.items() if b.unavailable(inputs) is None
                    and not (n == "triton" and inputs.x.device.type == "cpu"))  # fmt: skip
    backend = BACKENDS[name]
    why = backend.unavailable(inputs)
    if why is not None:
        raise RuntimeError(
            f"the {name!r} loop backend was asked for but cannot run this {inputs.cell.name} "
            f"layer: {why}. Use RNNDROP_LOOP=auto (or set_loop_backend(None)) to let rnndrop "
            "pick one that can."
        )
    return backend


class RNNLayer(torch.autograd.Function):
    """One layer and direction as one autograd node; the backend does the work.

    Inputs after ``c0``: the :class:`LayerMasks` fields, then ``LayerInputs.extra``."""

    @staticmethod
    def forward(ctx, backend, cell, reverse, x, w_ih, b_x, w_hh, b_h, h0, c0, *rest):
        masks, extra = rest[:_N_MASKS], rest[_N_MASKS:]
        inp = LayerInputs(cell, x, w_ih, b_x, w_hh, b_h, h0, c0, LayerMasks(*masks), reverse,
                          extra=extra)  # fmt: skip
        saved = backend.forward(inp)
        ctx.backend, ctx.cell, ctx.reverse, ctx.n_saved = backend, cell, reverse, len(rest)
        ctx.save_for_backward(x, w_ih, b_x, w_hh, b_h, h0, c0, *rest, *saved.tensors())
        c_last = None
        if saved.c_seq is not None:
            c_last = saved.c_seq[0] if reverse else saved.c_seq[-1]
        return saved.h_seq, c_last

    @staticmethod
    def backward(ctx, dh_seq, dc_last):
        x, w_ih, b_x, w_hh, b_h, h0, c0, *rest = ctx.saved_tensors
        inputs, saved = rest[: ctx.n_saved], rest[ctx.n_saved :]
        masks, extra = inputs[:_N_MASKS], tuple(inputs[_N_MASKS:])
        if torch.is_grad_enabled():  # create_graph=True: a gradient that is differentiable
            return RNNLayer._differentiable_backward(ctx, (x, w_ih, b_x, w_hh, b_h, h0, c0),
                                                     masks, extra, dh_seq, dc_last)  # fmt: skip
        inp = LayerInputs(ctx.cell, x, w_ih, b_x, w_hh, b_h, h0, c0, LayerMasks(*masks),
                          ctx.reverse, extra=extra)  # fmt: skip
        need = ctx.needs_input_grad
        need_x, need_w = need[3], any(need[4:8])
        need_masks = tuple(bool(n) for n in need[10 : 10 + _N_MASKS])
        args = (
            inp,
            Saved(*saved),
            None if dh_seq is None else dh_seq.contiguous(),
            None if dc_last is None else dc_last.contiguous(),
            need_x,
            need_w,
        )
        if any(need_masks):  # concrete dropout: the masks' gradients reach their rates
            g: Grads = ctx.backend.backward(*args, need_masks=need_masks)
            dmasks = [None] * len(masks) if g.dmasks is None else list(g.dmasks.tensors())
            dmasks = [d if n else None for d, n in zip(dmasks, need_masks, strict=True)]
        else:
            g = ctx.backend.backward(*args)
            dmasks = [None] * len(masks)
        dextra = g.dextra if g.dextra is not None else (None,) * len(extra)
        return (None, None, None, g.dx, g.dw_ih, g.db_x, g.dw_hh, g.db_h, g.dh0, g.dc0,
                *dmasks, *dextra)  # fmt: skip

    @staticmethod
    def _differentiable_backward(ctx, tensors, masks, extra, dh_seq, dc_last):
        """Double backward: re-run the layer as the plain-autograd reference loop from the
        saved inputs (which keep their own graph) and differentiate it with
        ``create_graph=True``, so the gradient is itself differentiable. First-order
        backward never comes here (autograd runs it with grad mode off)."""
        inputs = (*tensors, *masks, *extra)
        inp = LayerInputs(ctx.cell, *tensors, LayerMasks(*masks), ctx.reverse, extra=extra)
        outs = reference_layer(inp)
        pairs = [(o, g) for o, g in zip(outs, (dh_seq, dc_last), strict=True)
                 if o is not None and g is not None and o.requires_grad]  # fmt: skip
        wanted = [i for i, t in enumerate(inputs)
                  if t is not None and ctx.needs_input_grad[3 + i]]  # fmt: skip
        grads: list[Tensor | None] = [None] * len(inputs)
        if pairs and wanted:
            got = torch.autograd.grad([o for o, _ in pairs], [inputs[i] for i in wanted],
                                      [g for _, g in pairs], create_graph=True,
                                      allow_unused=True)  # fmt: skip
            for i, g in zip(wanted, got, strict=True):
                grads[i] = g
        return (None, None, None, *grads)


def _prep(t: Tensor | None, like: Tensor) -> Tensor | None:
    return None if t is None else t.to(like.dtype).contiguous()


def rnn_layer(
    cell: CellMath,
    x: Tensor,
    w_ih: Tensor | None,
    b_x: Tensor | None,
    w_hh: Tensor,
    b_h: Tensor | None,
    h0: Tensor,
    c0: Tensor | None = None,
    masks: LayerMasks | None = None,
    *,
    reverse: bool = False,
    backend: str | None = None,
    reference: bool | None = None,
    w_hr: Tensor | None = None,
    extra: tuple[Tensor, ...] = (),
) -> tuple[Tensor, Tensor | None]:
    """Run one layer (one direction): ``h`` for every step ``(T, B, H)`` and the last ``c``.

    Arguments as in :class:`~rnndrop.kernels.contract.LayerInputs`; ``backend`` names one
    (default: :func:`get_loop_backend`). ``reference``: True runs the plain-autograd
    reference loop (:func:`~rnndrop.kernels.reference.reference_layer`), False a backend,
    None (default) the reference only where a backend cannot serve
    (:func:`~rnndrop.kernels.reference.wants_reference`: torch.func transforms, export,
    tracing, compiled inference). ``w_hr``: the LSTM's projection ``(P, H)`` (``proj_size``),
    run by the reference loop only (no backend has the projection step). ``extra``: the
    cell's own parameters (``LayerInputs.extra``). Returns ``(h_seq, c_last)``, ``c_last``
    None for a cell without a cell state.
    """
    masks = masks or LayerMasks()
    dtype = compute_dtype(x, cell)
    tensors = (x, w_ih, b_x, w_hh, b_h, h0, c0, *masks.tensors(), *extra)
    if w_hr is not None and backend is not None:
        raise RuntimeError(
            f"the {backend!r} loop backend cannot run an LSTM with proj_size > 0 (no backend "
            "has the projection step); leave the backend unset: the reference loop runs it"
        )
    if reference is None:
        reference = w_hr is not None or (
            backend is None and wants_reference((*tensors, w_hr)) is not None
        )
    if reference:
        # transforms, exporters and tracers see plain differentiable ops (same math)
        with torch.autocast(x.device.type, enabled=False):
            x = x.to(dtype)
            cast = [None if t is None else t.to(dtype) for t in tensors[1:]]
            inp = LayerInputs(cell, x, *cast[:6], LayerMasks(*cast[6 : 6 + _N_MASKS]), reverse,
                              None if w_hr is None else w_hr.to(dtype),
                              tuple(cast[6 + _N_MASKS :]))  # fmt: skip
            return reference_layer(inp)
    return _fast_layer(cell, x, w_ih, b_x, w_hh, b_h, h0, c0, masks, dtype, reverse, backend,
                       extra)  # fmt: skip


@torch.compiler.disable  # a hand-written autograd node (and compiled kernels): opaque to dynamo
def _fast_layer(cell, x, w_ih, b_x, w_hh, b_h, h0, c0, masks, dtype, reverse, backend, extra=()):
    """:func:`rnn_layer` through a loop backend: one ``RNNLayer`` node."""
    if torch.jit.is_tracing():  # a trace would record an opaque Python node (legacy ONNX:
        raise RuntimeError(  # a constant): never a silently wrong graph
            f"a trace cannot record the {backend!r} loop backend's autograd node; leave the "
            "backend unset (the reference loop is traced) or use torch.export.export"
        )
    with torch.autocast(x.device.type, enabled=False):
        x = x.to(dtype).contiguous()
        inp = LayerInputs(cell, x, *[_prep(t, x) for t in (w_ih, b_x, w_hh, b_h, h0, c0)],
                          LayerMasks(*[_prep(m, x) for m in masks.tensors()]), reverse,
                          extra=tuple(_prep(e, x) for e in extra))  # fmt: skip
        chosen = select_backend(inp, backend)
        return RNNLayer.apply(chosen, cell, reverse, inp.x, inp.w_ih, inp.b_x, inp.w_hh,
                              inp.b_h, inp.h0, inp.c0, *inp.masks.tensors(),
                              *inp.extra)  # fmt: skip


def compute_dtype(x: Tensor, cell: CellMath | None = None) -> torch.dtype:
    """The dtype a loop layer computes in: what ``cell``'s fused op would return for ``x``
    under the autocast state at hand (:func:`fused_dtype`), so that every scheme of a cell
    gives the dtype ``torch.nn.LSTM``/``GRU`` gives: on CPU, autocast runs the LSTM in
    bfloat16 and leaves the GRU in float32. Without a cell: autocast's dtype where autocast
    is on for ``x``'s device and ``x`` is a float32 or lower-precision input, else ``x``'s.
    Every tensor of the layer is cast to it (differentiably: float32 parameters get float32
    gradients)."""
    device = x.device.type
    if (x.dtype not in (torch.float32, torch.float16, torch.bfloat16)
            or not torch.is_autocast_enabled(device)):  # fmt: skip
        return x.dtype
    if cell is None or not hasattr(cell, "fused"):
        return torch.get_autocast_dtype(device)
    return fused_dtype(cell, x, x.dtype)


_FUSED_DTYPES: dict[tuple, torch.dtype] = {}


def fused_dtype(cell, x: Tensor, weight_dtype: torch.dtype) -> torch.dtype:
    """The dtype ``cell``'s fused op returns for an input like ``x`` and weights of
    ``weight_dtype`` under the current autocast state: measured once per cell, device type,
    autocast dtype and input/weight dtypes by running the op on a one-unit layer, so it
    follows torch's own autocast op lists (which differ per op and device)."""
    device = x.device.type
    if not torch.is_autocast_enabled(device) or cell.fused is None:
        # a cell without a fused op (the LayerNorm LSTM) is no op on autocast's lists: it
        # computes in the input's dtype, as autocast leaves such ops (and its LayerNorms
        # would ask for float32 anyway)
        return x.dtype
    key = (cell.name, device, torch.get_autocast_dtype(device), x.dtype, weight_dtype)
    if key not in _FUSED_DTYPES:
        if torch.compiler.is_compiling():  # no probe inside a graph: torch's lists as of 2.x
            on = device != "cpu" or cell.name == "lstm"
            return torch.get_autocast_dtype(device) if on else x.dtype
        G = cell.gates
        kw = {"device": x.device, "dtype": weight_dtype}
        one = torch.zeros(1, 1, 1, device=x.device, dtype=x.dtype)
        state = tuple(torch.zeros(1, 1, 1, **kw) for _ in range(2 if cell.has_cell else 1))
        weights = [torch.zeros(G, 1, **kw), torch.zeros(G, 1, **kw), torch.zeros(G, **kw),
                   torch.zeros(G, **kw)]  # fmt: skip
        with torch.no_grad():
            out, _ = cell.fused(one, None, state, weights, True, 1, False, False, False)
        _FUSED_DTYPES[key] = out.dtype
    return _FUSED_DTYPES[key]
