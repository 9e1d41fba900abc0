"""The contract between the recurrent engine and a loop backend.

The engine (:class:`rnndrop.nn.rnn.RNNBase`) draws the masks of a forward call, and for each
layer and direction that must run the time loop hands a backend one :class:`LayerInputs`.
A backend returns the output sequence and a :class:`Saved` record in forward, and
:class:`Grads` in backward. Nothing else passes between them. The layout of every tensor is
written here once; every backend (``python``, ``cpp``, ``triton``) reads and writes
exactly these layouts, and the tests hold each backend to the ``python`` reference.

Notation: ``T`` steps, ``B`` batch, ``I`` input features, ``H`` hidden units, ``G`` gates
of the cell (4 for the LSTMs, 3 for the GRU, 1 for the Elman RNN), ``Tm`` 1 (mask shared over
time) or ``T``.
All tensors are contiguous and share the input's device and dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import NamedTuple, Protocol

from torch import Tensor

__all__ = ["Backend", "CellMath", "Grads", "LayerInputs", "LayerMasks", "Saved", "State"]


class CellMath(Protocol):
    """What a backend needs to know of a cell (see :mod:`rnndrop.nn.cells`).

    The step math, one step of one layer and direction (the ``python`` loop calls it; the
    compiled backends mirror it)::

        step_forward(a, rec, prev, m, out=None) -> State
        step_backward(d, prev, s, m, dgx, dgh, dm=None) -> State

    ``a`` ``(B, G·H)``: the gates' pre-activations (input projection plus, unless
    ``split_recurrent``, the recurrent product); ``rec``: the recurrent product ``(B, G·H)``
    of a ``split_recurrent`` cell (bias ``b_h`` included), else None; ``prev``: the
    :class:`State` ``(h_{t-1}, c_{t-1})``; ``m``: the step's :class:`LayerMasks`
    (:meth:`LayerMasks.at`; the cell applies the ``"step"`` fields). ``out``: the step's
    :class:`Saved` rows (:meth:`Saved.at`) in the loop: ``a`` is ``out.acts`` and becomes
    the activations in place, and the cell writes what it saves (``ct_seq``, ``hn_seq``);
    None: out-of-place ops only, differentiable by autograd (step cells). Returns the new
    :class:`State` (the loop copies it into ``out.h_seq`` / ``out.c_seq``).

    Backward: ``d`` = ``State(dL/dh_t, dL/dc_t)``; ``s`` the step's :class:`Saved` rows;
    writes dL/d(gates) into ``dgx`` (input side) and ``dgh`` (recurrent side; the same
    buffer unless ``split_recurrent``); ``dm``: None, or a :class:`LayerMasks` of ``(B,
    H)`` buffers for the gradients of the ``"step"`` masks (concrete dropout; a field None
    where not wanted). Returns ``State(direct dL/dh_{t-1}, dL/dc_{t-1})``: the part of the
    gradient into ``h_{t-1}`` that does not go through ``W_hh`` (zoneout's or the GRU's
    carry; None if nothing) and, with a cell state, the gradient into ``c_{t-1}``.

    A cell with parameters of its own (:attr:`LayerInputs.extra`) takes them as the keyword
    ``params`` in both, and in backward ``dparams``: one ``(B, n)`` accumulator per
    parameter, into which the step adds its gradient (the loop sums them over the batch).
    A cell with ``saved_width`` writes its row of :attr:`Saved.extra` (``out.extra``) and
    reads it back (``s.extra``).
    """

    name: str  # "lstm", "gru", "rnn_tanh", "rnn_relu", "layernorm_lstm": backends dispatch on it
    gates: int  # G
    has_cell: bool  # carries c besides h
    split_recurrent: bool  # W_hh h enters the gates apart from W_ih x (GRU's r ⊙ (W_hn h + b_hn))
    saved_width: Callable[[int], int] | None  # H -> W of Saved.extra, or None (saves none)
    step_forward: Callable[..., State]
    step_backward: Callable[..., State]


class State(NamedTuple):
    """The recurrent state of one step: ``h`` ``(B, H)``, and ``c`` for cells with a cell
    state (else None). Also the gradients with respect to it (``dL/dh``, ``dL/dc``)."""

    h: Tensor
    c: Tensor | None = None


@dataclass
class LayerMasks:
    """The masks of one layer and direction; ``None`` where a site is off.

    Each field says where its mask acts (``LayerMasks.where(name)``): ``"projection"`` (on
    ``x`` in the input projection, before the loop), ``"recurrent"`` (on ``h_{t-1}`` where
    the loop multiplies it by ``W_hh``) or ``"step"`` (inside the cell's step math, which
    reads it from the step's masks, :meth:`at`). Backends iterate over the fields rather
    than count them. A ``"step"`` field also says which value stands for it when it is
    absent (``LayerMasks.absent(name)``): 1 for a mask that multiplies, 0 for zoneout's
    weight of the previous value (the compiled loop fills an absent mask's row with it).
    ``LayerMasks.site(name)`` names the :data:`rnndrop.config.SITES` entry whose masks the
    field carries (the field's own name unless its metadata says ``"site"``).

    Attributes:
        input: ``(G, Tm, B|1, I)`` per-gate (untied) masks on ``x``; tied input masks are
            applied to ``x`` by the engine and never reach a backend.
        recurrent: ``(Tm, Gr, B, H)`` masks on ``h_{t-1}`` where it enters ``W_hh``,
            ``Gr`` = 1 (tied) or ``G`` (one per gate block of ``W_hh``).
        candidate: ``(Tm, B, H)`` mask on the candidate (LSTM ``g``, GRU ``n``).
        cell: ``(Tm, B, H)`` mask on the new cell state ``c̃_t`` of a cell with one
            (Moon et al. 2015: the masked value is carried and read by ``h_t``).
        zoneout_h, zoneout_c: ``(T|1, B, H)`` weight given to the previous value
            (0/1 sampled, ``z`` in eval, 1 past the end of a padded sequence).
    """

    # metadata: where the mask acts, and its time dim where not 0
    input: Tensor | None = field(default=None, metadata={"acts": "projection", "time_dim": 1})
    recurrent: Tensor | None = field(default=None, metadata={"acts": "recurrent"})
    # "absent": the value that leaves the step as without the mask (step fields only)
    candidate: Tensor | None = field(default=None, metadata={"acts": "step", "absent": 1})
    cell: Tensor | None = field(default=None, metadata={"acts": "step", "absent": 1})
    zoneout_h: Tensor | None = field(
        default=None, metadata={"acts": "step", "absent": 0, "site": "zoneout_hidden"}
    )
    zoneout_c: Tensor | None = field(
        default=None, metadata={"acts": "step", "absent": 0, "site": "zoneout_cell"}
    )

    def tensors(self) -> tuple[Tensor | None, ...]:
        return tuple([getattr(self, name) for name in _MASK_NAMES])

    @staticmethod
    def names() -> tuple[str, ...]:
        """The field names, in order (one flag each in a backend's ``need_masks``)."""
        return _MASK_NAMES

    @staticmethod
    def where(name: str) -> str:
        """Where the field's mask acts: ``"projection"``, ``"recurrent"`` or ``"step"``."""
        return _MASK_ACTS[name]

    @staticmethod
    def step_names() -> tuple[str, ...]:
        """The ``"step"`` fields, in field order: the masks a cell's step math reads (the
        compiled loop takes them as one list in this order)."""
        return _STEP_NAMES

    @staticmethod
    def absent(name: str) -> int:
        """The value of a ``"step"`` mask that is absent: 1 (a multiplying mask) or 0
        (zoneout's weight of the previous value)."""
        return _STEP_ABSENT[name]

    @staticmethod
    def site(name: str) -> str:
        """The site of :data:`rnndrop.config.SITES` whose masks the field carries."""
        return _MASK_SITE[name]

    def at(self, t: int) -> LayerMasks:
        """Step ``t``'s masks: each mask without its time dim (input ``(G, B|1, I)``,
        recurrent ``(Gr, B, H)``, the others ``(B, H)``); a mask shared over time (time dim
        of 1) is the same at every step. What a cell's step math reads."""
        # a list, not a generator: once per step of every loop
        return LayerMasks(*[None if m is None else m.select(d, 0 if m.shape[d] == 1 else t)
                            for m, d in zip(self.tensors(), _MASK_TIME_DIMS,
                                            strict=True)])  # fmt: skip


_MASK_NAMES: tuple[str, ...] = tuple(f.name for f in fields(LayerMasks))
_MASK_ACTS: dict[str, str] = {f.name: f.metadata["acts"] for f in fields(LayerMasks)}
_MASK_SITE: dict[str, str] = {f.name: f.metadata.get("site", f.name) for f in fields(LayerMasks)}
_MASK_TIME_DIMS: tuple[int, ...] = tuple(f.metadata.get("time_dim", 0) for f in fields(LayerMasks))
_STEP_NAMES: tuple[str, ...] = tuple(n for n in _MASK_NAMES if _MASK_ACTS[n] == "step")
_STEP_ABSENT: dict[str, int] = {f.name: f.metadata.get("absent", -1) for f in fields(LayerMasks)
                                if f.name in _STEP_NAMES}  # fmt: skip
if any(v not in (0, 1) for v in _STEP_ABSENT.values()):  # a new step field without its value
    raise TypeError(
        "every 'step' field of LayerMasks needs metadata 'absent': 1 (a mask that multiplies) "
        f"or 0 (a weight of the previous value); got {_STEP_ABSENT}"
    )


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
        extra: the cell's own parameters beyond the above, each a 1-D tensor (never None:
            the cell puts zeros for an absent one), in the order its ``extra_inputs`` gives
            (:class:`rnndrop.nn.cells.Cell`); empty for torch's cells. The LayerNorm LSTM:
            ``(b (4H), γ_x (4H), γ_h (4H), γ_c (H), β_c (H))``, its gate bias added after
            the normalisation (so ``b_x`` and ``b_h`` are None) and its LayerNorm gains and
            shift. A backend passes them to the cell's step and returns their gradients in
            :attr:`Grads.dextra`; it never reads them itself.
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
    extra: tuple[Tensor, ...] = ()


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
        extra: ``(T, B, W)`` the row a cell with ``saved_width`` saves per step for its own
            backward, ``W = cell.saved_width(H)``, else None. The LayerNorm LSTM: the
            normalised ``x̂`` and ``ĥ`` (4H each), ``ĉ`` (H) and the three inverse standard
            deviations (``W = 9H + 3``). Backends allocate it and hand each step its row.
    """

    acts: Tensor
    h_seq: Tensor
    c_seq: Tensor | None = None
    ct_seq: Tensor | None = None
    hm_seq: Tensor | None = None
    hn_seq: Tensor | None = None
    extra: Tensor | None = None

    def tensors(self) -> tuple[Tensor | None, ...]:
        return tuple(getattr(self, f.name) for f in fields(self))

    def at(self, t: int) -> Saved:
        """Step ``t``'s rows (views): ``acts`` ``(B, G·H)``, the others ``(B, H)`` (``hm_seq``
        ``(Gr, B, H)``). What a cell's step math writes in forward and reads in backward."""
        return Saved(self.acts[t], self.h_seq[t], *(None if s is None else s[t]
                                                   for s in (self.c_seq, self.ct_seq)),
                     None if self.hm_seq is None else self.hm_seq[:, t],
                     *(None if s is None else s[t] for s in (self.hn_seq, self.extra)))  # fmt: skip


@dataclass
class Grads:
    """Backward's results; a field is None where it was not asked for or does not exist.

    ``dmasks`` holds the gradients of the masks (concrete dropout learns their rates), each
    shaped like its mask in :class:`LayerMasks`, None where not asked for. ``dextra`` holds
    the gradients of :attr:`LayerInputs.extra`, one per entry (None for a cell without).
    """

    dx: Tensor | None = None  # like x (the projection's gradient when w_ih is None)
    dw_ih: Tensor | None = None
    db_x: Tensor | None = None
    dw_hh: Tensor | None = None
    db_h: Tensor | None = None
    dh0: Tensor | None = None
    dc0: Tensor | None = None
    dmasks: LayerMasks | None = None
    dextra: tuple[Tensor, ...] | None = None


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
