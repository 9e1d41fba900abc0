"""The contract between the recurrent engine and a loop backend.

The engine (:class:`rnndrop.nn.rnn.RNNBase`) draws the masks of a forward call, and for each
layer and direction that must run the time loop hands a backend one :class:`LayerInputs`.
A backend returns the output sequence and a :class:`Saved` record in forward, and
:class:`Grads` in backward. Nothing else passes between them. The layout of every tensor is
written here once; every backend (``python``, ``cpp``, ``triton``) reads and writes
exactly these layouts, and the tests hold each backend to the ``python`` reference.

Notation: ``T`` steps, ``B`` batch, ``I`` input features, ``H`` hidden units, ``G`` gates
of the cell (4 for the LSTM, 3 for the GRU, 1 for the Elman RNN), ``Tm`` 1 (mask shared over
time) or ``T``.
All tensors are contiguous and share the input's device and dtype.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Protocol

from torch import Tensor

__all__ = ["Backend", "CellMath", "Grads", "LayerInputs", "LayerMasks", "Saved"]


class CellMath(Protocol):
    """What a backend needs to know of a cell (see :mod:`rnndrop.nn.cells`)."""

    name: str  # "lstm" | "gru" | "rnn_tanh" | "rnn_relu": backends dispatch on it
    gates: int  # G
    has_cell: bool  # carries c besides h
    split_recurrent: bool  # W_hh h enters the gates apart from W_ih x (GRU's r ⊙ (W_hn h + b_hn))


@dataclass
class LayerMasks:
    """The masks of one layer and direction; ``None`` where a site is off.

    Attributes:
        input: ``(G, Tm, B|1, I)`` per-gate (untied) masks on ``x``; tied input masks are
            applied to ``x`` by the engine and never reach a backend.
        recurrent: ``(Tm, Gr, B, H)`` masks on ``h_{t-1}`` where it enters ``W_hh``,
            ``Gr`` = 1 (tied) or ``G`` (one per gate block of ``W_hh``).
        candidate: ``(Tm, B, H)`` mask on the candidate (LSTM ``g``, GRU ``n``).
        zoneout_h, zoneout_c: ``(T|1, B, H)`` weight given to the previous value
            (0/1 sampled, ``z`` in eval, 1 past the end of a padded sequence).
    """

    input: Tensor | None = None
    recurrent: Tensor | None = None
    candidate: Tensor | None = None
    zoneout_h: Tensor | None = None
    zoneout_c: Tensor | None = None

    def tensors(self) -> tuple[Tensor | None, ...]:
        return tuple(getattr(self, f.name) for f in fields(self))


@dataclass
class LayerInputs:
    """One layer and direction, as the engine hands it to a backend.

    Attributes:
        cell: the cell's :class:`CellMath` (its name, gate count and state layout).
        x: ``(T, B, I)`` layer input, or with ``w_ih=None`` the ``(T, B, G·H)`` input
            projection with ``b_x`` already added.
        w_ih: ``(G·H, I)`` or None.
        b_x: ``(G·H,)`` bias added to the input projection, or None (LSTM: ``b_ih + b_hh``;
            GRU: ``b_ih``).
        w_hh: ``(G·H, H)``, as this call uses it (weight drop and folded masks applied).
        b_h: ``(G·H,)`` bias added to the recurrent product, or None (GRU: ``b_hh``, which
            must stay inside ``r ⊙ (W_hn h + b_hn)``; LSTM: None).
        h0: ``(B, H)``.
        c0: ``(B, H)`` for cells with a cell state, else None.
        masks: the :class:`LayerMasks`.
        reverse: run from the last step to the first (the backward direction).
        w_hr: ``(P, H)`` the LSTM's projection (``proj_size = P``): ``h_t = W_hr (o ⊙ tanh
            c_t)``, so ``h`` (and ``h0``, ``W_hh``'s columns, the recurrent and hidden
            zoneout masks) has ``P`` features. None without one. Only the reference loop
            (:mod:`rnndrop.kernels.reference`) runs it.
    """

    cell: CellMath
    x: Tensor
    w_ih: Tensor | None
    b_x: Tensor | None
    w_hh: Tensor
    b_h: Tensor | None
    h0: Tensor
    c0: Tensor | None
    masks: LayerMasks
    reverse: bool = False
    w_hr: Tensor | None = None


@dataclass
class Saved:
    """What forward leaves for backward (beside the :class:`LayerInputs`).

    Attributes:
        acts: ``(T, B, G·H)`` gate activations after their nonlinearity (the candidate
            before its mask).
        h_seq: ``(T, B, H)`` the layer's output ``h_t``.
        c_seq: ``(T, B, H)`` ``c_t`` (cells with a cell state), else None.
        ct_seq: ``(T, B, H)`` ``c̃_t``, the cell state before zoneout (only with
            ``zoneout_c``), else None.
        hm_seq: ``(Gr, T, B, H)`` masked ``h_{t-1}`` per gate group (only with a recurrent
            mask), else None.
        hn_seq: ``(T, B, H)`` the GRU's ``W_hn h_{t-1} + b_hn``, else None.
    """

    acts: Tensor
    h_seq: Tensor
    c_seq: Tensor | None = None
    ct_seq: Tensor | None = None
    hm_seq: Tensor | None = None
    hn_seq: Tensor | None = None

    def tensors(self) -> tuple[Tensor | None, ...]:
        return tuple(getattr(self, f.name) for f in fields(self))


@dataclass
class Grads:
    """Backward's results; a field is None where it was not asked for or does not exist.

    ``dmasks`` holds the gradients of the masks (concrete dropout learns their rates), each
    shaped like its mask in :class:`LayerMasks`, None where not asked for.
    """

    dx: Tensor | None = None  # like x (the projection's gradient when w_ih is None)
    dw_ih: Tensor | None = None
    db_x: Tensor | None = None
    dw_hh: Tensor | None = None
    db_h: Tensor | None = None
    dh0: Tensor | None = None
    dc0: Tensor | None = None
    dmasks: LayerMasks | None = None


class Backend(Protocol):
    """A loop backend: one layer and direction, forward and backprop through time.

    ``unavailable(inputs)`` returns None if the backend can run these tensors, else a
    sentence saying why (the engine shows it when the backend was asked for by name).
    A mask that requires grad (concrete dropout) asks for its gradient in backward:
    ``need_masks`` has one flag per :class:`LayerMasks` field, and ``Grads.dmasks`` answers
    (a backend that cannot must say so in ``unavailable``).
    """

    name: str

    def unavailable(self, inputs: LayerInputs) -> str | None: ...

    def forward(self, inputs: LayerInputs) -> Saved: ...

    def backward(
        self,
        inputs: LayerInputs,
        saved: Saved,
        dh_seq: Tensor | None,
        dc_last: Tensor | None,
        need_x: bool,
        need_w: bool,
        need_masks: tuple[bool, ...] = (),
    ) -> Grads: ...
