r"""Step-wise cells: drop-in ``torch.nn.LSTMCell`` / ``torch.nn.GRUCell`` with every scheme.

One call is one time step of a one-layer :class:`~rnndrop.nn.LSTM` / :class:`~rnndrop.nn.GRU`,
with the same dropout sites, policies and equations as the layer's loop path: its masks are
drawn by the layer's :class:`~rnndrop.nn.masks.ForwardMasks` (one step, ``T = 1``) and its
step math is the cell's own ``step_forward`` (:mod:`rnndrop.nn.cells`), run out of place so
that autograd differentiates it (to any order). What a layer keeps for one
forward call, a step cell has to keep across calls: the per-sequence masks (and the
weight-drop mask) of the sequence being run. They live in a :class:`CellMasks` object,
either passed explicitly every step (``masks=cell.sample_masks(B)``) or bound to a sequence
scope (``with cell.sequence():``) that draws them afresh and forgets them on exit. A
per-sequence scheme that samples (training, MC) refuses a call that has neither: a decoder
started from an encoder's state would otherwise reuse one sequence's masks for the next.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import _VF, Tensor, nn

from ..config import SITES, DropoutSpec, RecurrentDropout, as_dropout, is_preset
from ..kernels.contract import LayerMasks, State
from .cells import GRU_CELL, LSTM_CELL, Cell
from .dropout import StochasticModule, script_refusal
from .masks import ForwardMasks, is_active, site_name

__all__ = ["CellMasks", "GRUCell", "LSTMCell", "StepCellBase", "cell_dropout", "sequence"]

#: Sites whose masks follow the ``time``/``batch`` policy (and ``tied`` for input/recurrent).
_POLICY_SITES: tuple[str, ...] = tuple(
    n for n, s in SITES.items() if s.policy and s.path != "model" and s.layers != "inner"
)  # input, recurrent, output, candidate: between_layers means nothing for one cell


@dataclass(repr=False, eq=False)  # tensors have no truth value: identity, as for modules
class CellMasks:
    """The masks of one sequence run through a step cell (:class:`LSTMCell`, :class:`GRUCell`).

    Build it with :meth:`StepCellBase.sample_masks` (a new sequence's per-sequence masks,
    or a batch whose finished rows get new ones), :meth:`StepCellBase.sequence` (the scope's
    object), :meth:`StepCellBase.masks_from` (step ``t`` of a layer's recorded masks), or
    directly. Passed as ``masks=`` to every step of the sequence. A field that is set is used
    as it is at every call it is passed to (while sampling; in eval the object is ignored); a
    field left ``None`` for an active site is drawn: once and stored here for a per-sequence
    site (``time="per_sequence"``, and ``weight_hh`` always), afresh at every call for a
    per-step site and for zoneout (which is never stored).

    ``masks[rows]`` keeps the rows of a batch (an index, slice, list, index tensor or boolean
    ``(B,)`` tensor, as ``torch.arange(B)[rows]`` reads it): per-sample masks are indexed
    along their batch dim, masks shared by the batch (``B|1`` of 1, ``weight_hh``) are kept
    whole. A shrinking batch (environments that finish and leave) runs on with
    ``masks[alive]``.

    Shapes (without the time dim of the layer's recorded masks; ``B|1``: per sample or per
    batch; ``G`` gates, 4 LSTM, 3 GRU):

    Attributes:
        batch_size: the batch size the masks were drawn for; a call with another raises.
            ``None``: not tied to one (shapes must still broadcast).
        input: on ``x``: ``(B|1, I)`` tied, or ``(G, B|1, I)`` one per gate block of
            ``W_ih``.
        recurrent: on ``h_{t-1}`` where it enters ``W_hh``: ``(Gr, B|1, H)``, ``Gr`` 1
            (tied) or ``G`` (one per gate block of ``W_hh``).
        candidate: on the candidate (LSTM ``g``, GRU ``n``): ``(B|1, H)``.
        cell: on the LSTM's new cell state ``c̃'``: ``(B|1, H)``.
        output: on the returned output ``h``: ``(B|1, H)``.
        weight_hh: on the elements of ``W_hh``: ``(G·H, H)``.
        zoneout_hidden, zoneout_cell: weight of the previous value, 1 = keep it:
            ``(B|1, H)``.
    """

    batch_size: int | None = None
    input: Tensor | None = None
    recurrent: Tensor | None = None
    candidate: Tensor | None = None
    cell: Tensor | None = None
    output: Tensor | None = None
    weight_hh: Tensor | None = None
    zoneout_hidden: Tensor | None = None
    zoneout_cell: Tensor | None = None

    def __repr__(self) -> str:
        sites = ", ".join(f"{site}={list(m.shape)}" for site, m in self.items())
        return f"CellMasks(batch_size={self.batch_size}" + (f", {sites})" if sites else ")")

    def items(self) -> list[tuple[str, Tensor]]:
        """``(site, mask)`` for every mask that is set."""
        return [(site, m) for site, m in zip(_MASK_SITES, self._masks(), strict=True)
                if m is not None]  # fmt: skip

    def _masks(self) -> tuple[Tensor | None, ...]:
        return tuple([getattr(self, site) for site in _MASK_SITES])

    def _recorded(self) -> dict[str, Tensor]:
        """The masks that are set in a layer's recorded layout, by recorded name (what
        :class:`~rnndrop.nn.masks.ForwardMasks` takes as ``given``); each view is made once
        per mask object, not at every step."""
        cache = self.__dict__.setdefault("_recorded_views", {})
        out = {}
        for site, m in self.items():
            hit = cache.get(site)
            if hit is None or hit[0] is not m:
                hit = cache[site] = (m, _recorded_layout(site, m))
            out[_RECORD_NAMES[site]] = hit[1]
        return out

    def _size(self) -> int:
        """The batch size: ``batch_size``, else the per-sample masks' (1 if none has one)."""
        if self.batch_size is not None:
            return self.batch_size
        sizes = {m.shape[-2] for site, m in self.items() if site != "weight_hh"} - {1}
        if len(sizes) > 1:
            raise ValueError(f"CellMasks: masks of different batch sizes {sorted(sizes)}")
        return sizes.pop() if sizes else 1

    def rows(self, index) -> Tensor:
        """The batch rows ``index`` selects, as a 1-D index tensor (see the class)."""
        rows = torch.arange(self._size())[index]
        return rows.reshape(-1) if rows.dim() == 0 else rows

    def __getitem__(self, index) -> CellMasks:
        rows = self.rows(index)
        B = self._size()
        out = CellMasks(batch_size=None if self.batch_size is None else len(rows))
        for site, m in self.items():
            if site != "weight_hh" and m.shape[-2] == B and B > 1:  # per sample: its rows
                m = m.index_select(-2, rows.to(m.device))
            setattr(out, site, m)
        return out


def cell_dropout(dropout: DropoutSpec, cell: str = "lstm") -> RecurrentDropout:
    """A step cell's reading of ``dropout``: a preset keeps the sites of one cell.

    A preset names a network's scheme (Gal & Ghahramani's variational dropout masks the
    inputs, the recurrence, between the layers and the outputs). One step cell is one layer's
    step: it keeps the preset's ``input``, ``recurrent``, ``candidate``, ``weight_hh`` and
    zoneout rates, and leaves ``between_layers``, ``output`` and ``embedding`` to the model
    around it (:class:`~rnndrop.nn.LockedDropout` on what the cell returns, for example), so
    that ``cell(x, hx)`` returns the state as ``torch.nn.LSTMCell`` does. Anything else (a
    config object, a dict of fields, a float) is read as :func:`~rnndrop.config.as_dropout`
    reads it.

    Args:
        dropout: what the user passed as ``dropout``.
        cell: ``"lstm"`` or ``"gru"`` (GRU zoneout is on ``h``).
    """
    cfg = as_dropout(dropout, cell)
    if is_preset(dropout) and (cfg.between_layers or cfg.output or cfg.embedding):
        cfg = cfg.replace(between_layers=0.0, output=0.0, embedding=0.0,
                          embedding_batch="per_batch")  # fmt: skip
    return cfg


@contextlib.contextmanager
def sequence(model: nn.Module, batch_size: int | None = None) -> Iterator[nn.Module]:
    """Open :meth:`StepCellBase.sequence` on every step cell of ``model`` (one sequence).

    For a model whose forward runs its cells step by step: each ``with`` block is one
    sequence with fresh per-sequence masks, as a training step or one Monte Carlo pass::

        with torch.no_grad(), mc_dropout(model):
            for _ in range(50):
                with rnndrop.nn.sequence(model):
                    outs.append(model(x))

    Args:
        model: a module holding :class:`LSTMCell` / :class:`GRUCell` (or one).
        batch_size: passed to each cell's scope.
    """
    cells = [m for m in model.modules() if isinstance(m, StepCellBase)]
    with contextlib.ExitStack() as stack:
        for cell in cells:
            stack.enter_context(cell.sequence(batch_size))
        yield model


class _DroppedLinear(torch.autograd.Function):
    """``h (W ⊙ M)ᵀ`` saving ``W`` and ``M``, not their product.

    Weight drop keeps one mask for the whole sequence; plain autograd would save a fresh
    ``W ⊙ M`` at every step until backward (a weight-sized copy per step). Here every step
    saves the parameter and the sequence's one mask, and rebuilds the product in backward.
    Backward is written with differentiable ops, so double backward works.
    """

    @staticmethod
    def forward(h: Tensor, w: Tensor, mask: Tensor) -> Tensor:
        return h.mm((w * mask).t())

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        h, w, mask = inputs
        ctx.save_for_backward(h, w, mask)

    @staticmethod
    def backward(ctx, grad: Tensor):
        h, w, mask = ctx.saved_tensors
        gh = grad.mm(w * mask) if ctx.needs_input_grad[0] else None
        gw = grad.t().mm(h) * mask if ctx.needs_input_grad[1] else None
        return gh, gw, None


def _linear(h: Tensor, w: Tensor, mask: Tensor | None, bias: Tensor | None = None) -> Tensor:
    if mask is None:
        return nn.functional.linear(h, w, bias)
    out = _DroppedLinear.apply(h, w, mask)
    return out if bias is None else out + bias


def _input_gates(x: Tensor, w_ih: Tensor, b_ih: Tensor | None, gate_masks: Tensor | None):
    """``x W_ihᵀ + b_ih``; per gate ``(x ⊙ m_k) W_ih,kᵀ`` with untied ``(G, B|1, I)`` masks."""
    if gate_masks is None:
        return nn.functional.linear(x, w_ih, b_ih)
    G = gate_masks.shape[0]
    H = w_ih.shape[0] // G
    xp = torch.cat([nn.functional.linear(x * gate_masks[k], w_ih[k * H : (k + 1) * H])
                    for k in range(G)], 1)  # fmt: skip
    return xp if b_ih is None else xp + b_ih


def _recurrent_gates(hm: Tensor, w_hh: Tensor, w_mask: Tensor | None,
                     bias: Tensor | None = None) -> Tensor:  # fmt: skip
    """``(h ⊙ m) (W_hh ⊙ M)ᵀ + b`` for ``hm`` ``(Gr, B, H)``: one product, or one per gate
    block."""
    if hm.shape[0] == 1:
        return _linear(hm.squeeze(0), w_hh, w_mask, bias)
    H = w_hh.shape[1]
    blocks = [slice(k * H, (k + 1) * H) for k in range(hm.shape[0])]
    rec = torch.cat([_linear(hm[k], w_hh[b], None if w_mask is None else w_mask[b])
                     for k, b in enumerate(blocks)], 1)  # fmt: skip
    return rec if bias is None else rec + bias


class StepCellBase(StochasticModule):
    r"""One time step of a one-layer :class:`~rnndrop.nn.rnn.RNNBase`, with its dropout.

    A subclass names its :class:`~rnndrop.nn.cells.Cell` (gates, state, step math). Sites,
    policies and scaling are those of :class:`~rnndrop.config.RecurrentDropout` for layer 0
    of a one-layer network. A preset (``dropout="variational"``, ``{"preset": ...}``) is read
    for one cell (:func:`cell_dropout`): its ``input``, ``recurrent``, ``candidate``,
    ``weight_hh`` and zoneout rates; ``between_layers``, ``output`` and ``embedding`` act
    between the layers of a network and around it, so a cell leaves them to the model around
    it (``cell(x, hx)`` then returns the state, as ``nn.LSTMCell`` does). A config object is
    taken as it is: ``between_layers`` is ignored with a warning, ``embedding`` warns.

    Per-sequence masks (``time="per_sequence"``) and the weight-drop mask must stay the same
    for every step of a sequence and be new for the next sequence. The cell cannot tell where
    a sequence starts (a decoder starts from the encoder's state, never from ``hx=None``), so
    while it samples (training, MC) a call with such a site must say which sequence it is in:

    * a scope: ``with cell.sequence():`` around the steps of one sequence (or of one batch of
      sequences run in step). The scope draws the masks at its first call and forgets them on
      exit; every call inside without ``masks=`` uses them. :func:`sequence` opens one on
      every cell of a model (a decoder of two cells; one scope per MC pass);
    * explicit: ``masks = cell.sample_masks(B)`` at the start of a sequence, then
      ``cell(x_t, hx, masks=masks)`` at every step. :class:`CellMasks` can be indexed
      (``masks[alive]``) and refreshed row by row (``cell.sample_masks(B, keep=masks,
      redraw=done)``): a batch of environments that end at different steps.

    Outside both, nothing is kept: a call from ``hx=None`` is a sequence of its own with
    fresh masks, and a call that continues a sequence (``hx`` given) raises a
    ``RuntimeError`` that says how to scope it, rather than reuse or silently redraw masks.
    Schemes without per-sequence masks (per-step masks, zoneout) and deterministic eval need
    neither: their calls are independent.

    Per-step masks and zoneout are drawn afresh at every call. Zoneout mixes in the previous
    state, taken from ``hx``. Masks are sampled in training or in MC mode
    (:func:`rnndrop.nn.mc_dropout`); otherwise nothing is drawn and expectations apply
    (inverted dropout: identity; classic scaling: ``×(1-p)``; zoneout: ``z·prev +
    (1-z)·new``). With no site acting in a call, torch's own cell op runs with torch's
    arguments: bitwise ``torch.nn.LSTMCell`` / ``GRUCell``.

    ``output`` (set in a config object) masks the returned output only, never the state fed
    to the next step (as the layer's output site): with ``output > 0`` call ``cell(x, hx,
    return_output=True)``, which returns ``(output, state)``; the plain call raises a
    ``ValueError`` then, since it returns only the state.

    With ``record_masks = True``, ``last_masks`` holds the masks the last call used, under
    the layer's site names for layer 0 (``input/l0``, ``recurrent/l0``, ``candidate/l0``,
    ``weight_hh/l0``, ``zoneout_hidden/l0``, ``zoneout_cell/l0``, ``output``) and the layer's
    recorded shapes with a time dim of 1 (see :class:`rnndrop.nn.masks.ForwardMasks`);
    :meth:`masks_from` turns a layer's record into the :class:`CellMasks` of one step.
    """

    cell: Cell

    def __init__(
        self,
        cell: Cell,
        input_size: int,
        hidden_size: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        dropout: DropoutSpec = None,
    ) -> None:
        super().__init__()
        for name, value in (("input_size", input_size), ("hidden_size", hidden_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        self.cell = cell
        self.input_size, self.hidden_size, self.bias = input_size, hidden_size, bool(bias)
        self.dropout: RecurrentDropout = cell_dropout(dropout, cell.name)
        self.mc = False
        self.record_masks = False
        self.last_masks: dict[str, Tensor] = {}
        self._scopes: list[CellMasks] = []  # the open sequence() scopes, innermost last
        self._check_dropout()
        kw = {"device": device, "dtype": dtype}
        G, H = cell.gates, hidden_size
        self.weight_ih = nn.Parameter(torch.empty((G * H, input_size), **kw))
        self.weight_hh = nn.Parameter(torch.empty((G * H, H), **kw))
        if self.bias:
            self.bias_ih = nn.Parameter(torch.empty(G * H, **kw))
            self.bias_hh = nn.Parameter(torch.empty(G * H, **kw))
        else:
            self.register_parameter("bias_ih", None)
            self.register_parameter("bias_hh", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """torch's initialisation: every parameter ~ U(-1/√H, 1/√H)."""
        stdv = 1.0 / math.sqrt(self.hidden_size)
        for weight in self.parameters():
            nn.init.uniform_(weight, -stdv, stdv)

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if not self.bias:
            s += ", bias=False"
        return s + f", dropout={self.dropout.describe()}"

    def _check_dropout(self) -> None:
        cfg, kind = self.dropout, type(self).__name__
        cfg.check_cell(self.cell.name, kind)
        if cfg.concrete:
            raise ValueError(
                f"{kind}: concrete=True (learned rates) is supported by the layers "
                "rnndrop.nn.LSTM / GRU, not by the step-at-a-time cells; use fixed rates here"
            )
        if cfg.between_layers > 0:
            warnings.warn(
                f"{kind}: between_layers={cfg.between_layers} has no meaning for a single cell "
                "and is ignored (a float dropout means between_layers, as for nn.LSTM); use "
                "input= for the cell's input and output= for its output",
                UserWarning,
                stacklevel=4,
            )
        cfg.warn_model_sites(kind, stacklevel=4)

    # ---- sequence state ---------------------------------------------------------------

    @contextlib.contextmanager
    def sequence(self, batch_size: int | None = None) -> Iterator[CellMasks]:
        """A scope for one sequence: fresh per-sequence masks, forgotten on exit.

        Every call inside without ``masks=`` uses the scope's :class:`CellMasks`, drawn at
        its first call that samples (``batch_size`` given: drawn now, if the cell samples).
        Scopes nest; the innermost is used. A scope is one sequence: open it where the
        sequence starts (in ``forward``, per MC pass), not around a training loop, whose
        batches would then share masks. ::

            with cell.sequence():              # one decoder run, one set of masks
                hx = encoder_state
                for x_t in xs:
                    hx = cell(x_t, hx)

        Args:
            batch_size: ``B`` of the sequence; ``None``: the first call's (a later call with
                another raises).

        Yields:
            the scope's :class:`CellMasks` (it may be passed as ``masks=`` too).
        """
        masks = self.sample_masks(batch_size) if batch_size is not None else CellMasks()
        scopes = self._open_scopes()
        scopes.append(masks)
        try:
            yield masks
        finally:
            del scopes[next(i for i, m in enumerate(scopes) if m is masks)]

    def _open_scopes(self) -> list[CellMasks]:
        return self.__dict__.setdefault("_scopes", [])  # absent in cells pickled before

    def __getstate__(self):
        # a scope belongs to the `with` block that opened it: a copy made inside one (a target
        # network, a pickle) must not keep its masks after the block ends
        state = dict(self.__dict__)
        state["_scopes"] = []
        return state

    def reset(self) -> None:
        """Start a new sequence inside the open :meth:`sequence` scope: its masks are drawn
        again at the next call (for example at the start of each episode). Outside a scope
        there is nothing kept, and nothing to do."""
        for masks in self._open_scopes():
            for site, _ in masks.items():
                setattr(masks, site, None)

    def train(self, mode: bool = True):
        self.reset()
        return super().train(mode)

    def _apply(self, fn, recurse=True):
        self.reset()  # masks drawn on the old device or dtype would not match
        return super()._apply(fn, recurse)

    def _rate(self, site: str) -> float:
        return float(getattr(self.dropout, site))

    def _per_sequence_sites(self) -> tuple[str, ...]:
        """Active sites whose mask is kept for a whole sequence."""
        return self._plan()[2]

    def _plan(self) -> tuple[bool, bool, tuple[str, ...], tuple[str, ...]]:
        """What the config does, worked out once per config object (it is frozen): whether
        a site draws a mask when sampling, whether one acts in eval, the per-sequence sites,
        the sites that draw a mask when sampling."""
        cfg = self.dropout
        cached = self.__dict__.get("_plan_of")
        if cached is None or cached[0] is not cfg:
            sites = [s for s in _POLICY_SITES if cfg.time == "per_sequence" and self._rate(s) > 0]
            kept = (*sites, "weight_hh") if cfg.weight_hh > 0 else tuple(sites)
            drawn = tuple(s for s in _MASK_SITES if self._rate(s) > 0)
            plan = (is_active(cfg, 1, True), is_active(cfg, 1, False), kept, drawn)
            cached = self.__dict__["_plan_of"] = (cfg, plan)
        return cached[1]

    def sample_masks(
        self,
        batch_size: int,
        *,
        keep: CellMasks | None = None,
        redraw=None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> CellMasks:
        """A new sequence's per-sequence masks (and weight-drop mask), to pass as ``masks=``.

        Nothing is drawn unless the cell samples (training or MC mode); sites left empty are
        drawn on the first call that samples. Per-step masks and zoneout are drawn at each
        call.

        With ``keep`` and ``redraw``, the rows ``redraw`` selects start new sequences and the
        others go on: a recurrent policy whose environments end at different steps::

            masks = cell.sample_masks(B, keep=masks, redraw=done)   # done: (B,) bool

        The result has ``keep``'s masks, bit for bit, in the rows not selected and new ones
        in the rows selected (``keep`` itself is not changed). A mask shared by the whole
        batch (``batch="per_batch"``, ``weight_hh``) cannot be new for some rows only: a
        ``redraw`` of some but not all rows raises a ``ValueError`` then.

        Args:
            batch_size: ``B`` of the sequence (1 for unbatched input).
            keep: the batch's current masks (``B`` rows), to keep where not redrawn.
            redraw: the rows to draw anew: a ``(B,)`` bool tensor, indices, or a slice.
            device, dtype: of the masks (default: ``keep``'s, else the weights').
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 0:
            raise ValueError(f"batch_size must be an integer >= 0, got {batch_size!r}")
        if (keep is None) != (redraw is None):
            raise ValueError("sample_masks: pass keep= and redraw= together (or neither)")
        if keep is not None:
            return self._refresh(batch_size, keep, redraw)
        masks = CellMasks(batch_size=batch_size)
        if self.sampling:
            w = self.weight_hh
            like = torch.empty(0, device=device or w.device, dtype=dtype or w.dtype)
            fm = self._forward_masks(batch_size, like, True)
            for site in self._per_sequence_sites():
                setattr(masks, site, self._fresh(fm, site))
        return masks

    def _refresh(self, B: int, keep: CellMasks, redraw) -> CellMasks:
        """``keep`` with the rows ``redraw`` selects drawn anew (see :meth:`sample_masks`)."""
        kind = type(self).__name__
        if not isinstance(keep, CellMasks):
            raise TypeError(f"{kind}: keep must be a CellMasks, got {type(keep).__name__}")
        if keep._size() != B:
            raise ValueError(f"{kind}: keep has masks for batch size {keep._size()}, not {B}")
        if isinstance(redraw, Tensor) and redraw.dtype == torch.bool and redraw.shape != (B,):
            raise ValueError(f"{kind}: a bool redraw must have shape ({B},), got "
                             f"{tuple(redraw.shape)}")  # fmt: skip
        rows = keep.rows(redraw.cpu() if isinstance(redraw, Tensor) else redraw)
        new = torch.zeros(B, dtype=torch.bool)
        new[rows] = True
        if not self.sampling or not keep.items():  # nothing drawn yet: nothing to keep
            return dataclasses.replace(keep, batch_size=B)
        out = CellMasks(batch_size=B)
        some = bool(new.any()) and not bool(new.all())
        fm = self._forward_masks(B, keep.items()[0][1], True)
        for site, m in keep.items():
            shared = site == "weight_hh" or (m.shape[-2] == 1 and B > 1)
            if not new.any():
                fresh = m
            elif shared and some:
                raise ValueError(
                    f"{kind}: the {site!r} mask is shared by the whole batch "
                    f"({'weight drop' if site == 'weight_hh' else 'batch=per_batch'}), so it "
                    "cannot be drawn anew for some rows only: redraw every row, or use "
                    "per-sample masks (batch='per_sample', no weight_hh) for row-wise resets"
                )
            else:
                drawn = self._fresh(fm, site)
                # per sample (..., B, F): the selected rows from the new draw, the rest kept
                rows = new.to(m.device).unsqueeze(-1)
                fresh = drawn if shared else torch.where(rows, drawn, m)
            setattr(out, site, fresh)
        return out

    def masks_from(self, recorded: Mapping[str, Tensor], step: int = 0) -> CellMasks:
        """The :class:`CellMasks` of step ``step`` of a one-layer layer's recorded masks.

        ``recorded`` is the ``last_masks`` of an :class:`~rnndrop.nn.LSTM` /
        :class:`~rnndrop.nn.GRU` (``record_masks = True``, layer 0, forward direction) run
        with the same sites; masks shared over time (size-1 time dim) are taken whole.
        Replaying every step with its object (``cell(x[t], hx, masks=cell.masks_from(rec,
        t))``) reruns the layer's forward step by step. Zoneout masks are included, so the
        object is for step ``step`` only.
        """
        masks = CellMasks()
        for site in _MASK_SITES:
            key = _record_name(site)
            m = recorded.get(key)
            if m is None:
                continue
            time_dim = _time_dim(site, m)
            if time_dim is not None and m.shape[time_dim] != 1:
                if not 0 <= step < m.shape[time_dim]:
                    raise IndexError(
                        f"step {step} out of range for {key!r} of {m.shape[time_dim]} steps"
                    )
                m = m.narrow(time_dim, step, 1)
            setattr(masks, site, _cell_layout(site, m))
        return masks

    def _forward_masks(self, B: int, like: Tensor, sample: bool, record=None,
                       given=None) -> ForwardMasks:  # fmt: skip
        """The masks of one call under the layers' per-site rules: one step (``T = 1``) of
        layer 0 of a one-layer layer, never folded into a weight (the step always runs)."""
        return ForwardMasks(self.dropout, 1, B, self.hidden_size, like, sample, record,
                            gates=self.cell.gates, given=given, fold=False)  # fmt: skip

    def _fresh(self, fm: ForwardMasks, site: str) -> Tensor:
        """A new mask of a per-sequence ``site``, in :class:`CellMasks`' layout."""
        features = self.input_size if site == "input" else self.hidden_size
        return _cell_layout(site, fm.draw(site, features))

    def _sequence_masks(self, masks: CellMasks | None, B: int, x: Tensor, starts: bool):
        """The :class:`CellMasks` this call draws its per-sequence masks from (or None)."""
        kind = type(self).__name__
        scopes = self._open_scopes()
        if masks is None and scopes:
            masks = scopes[-1]
            if masks.batch_size is None:  # the scope's batch is its first call's
                masks.batch_size = B
        if masks is not None:
            if not isinstance(masks, CellMasks):
                raise TypeError(f"{kind}: masks must be a CellMasks, got {type(masks).__name__}")
            if masks.batch_size is not None and masks.batch_size != B:
                raise RuntimeError(
                    f"{kind}: masks were drawn for batch size {masks.batch_size}, this call has "
                    f"{B}: pass masks=cell.sample_masks({B}) for a new sequence, or "
                    "masks[rows] for the rows that go on"
                )
            # checked once per config, batch, input dtype and device, and mask objects
            key = (self.dropout, B, x.dtype, x.device, *masks._masks())
            if not _same(masks.__dict__.get("_checked"), key):
                self._check_masks(masks, B, x)
                masks.__dict__["_checked"] = key
            return masks
        if starts or not self._per_sequence_sites():
            # nothing is kept across calls: a call from hx=None starts a sequence with fresh
            # masks, and if the sequence goes on, its next call (hx given) lands below
            return None
        raise RuntimeError(
            f"{kind}: dropout {self.dropout.describe()} keeps masks for a whole sequence, and "
            "this call continues a sequence (hx given) without saying which one, so the "
            "cell cannot keep its masks. Run each sequence inside `with cell.sequence():` "
            f"(fresh masks per scope), or pass masks=cell.sample_masks({B}) at every step of "
            "it (rnndrop.nn.sequence(model) opens a scope on every cell of a model). Eval "
            "mode, and schemes without per-sequence masks, need neither"
        )

    def _check_masks(self, masks: CellMasks, B: int, x: Tensor) -> None:
        kind, cfg = type(self).__name__, self.dropout
        H, G, In = self.hidden_size, self.cell.gates, self.input_size
        for site, m in masks.items():
            if self._rate(site) == 0:
                raise ValueError(
                    f"{kind}: masks has a {site!r} mask but this cell's dropout has "
                    f"{site}=0 ({cfg.describe()})"
                )
            if (m.device, m.dtype) != (x.device, x.dtype):
                raise ValueError(
                    f"{kind}: the {site!r} mask is {m.dtype} on {m.device} but the input is "
                    f"{x.dtype} on {x.device}"
                )
            if site == "weight_hh":
                ok = tuple(m.shape) == (G * H, H)
                want = f"({G * H}, {H})"
            else:
                feat = In if site == "input" else H
                lead = {"input": (G,), "recurrent": (1, G)}.get(site, ())
                ok = m.dim() in ((2, 3) if site == "input" else (3,) if lead else (2,))
                ok = ok and m.shape[-1] == feat and m.shape[-2] in (1, B)
                ok = ok and (m.dim() == 2 or m.shape[0] in lead)
                gates = "(G|1, " if site == "recurrent" else "(G, " if site == "input" else "("
                want = f"{gates}B|1, {feat}) with G={G}, B={B}"
                if site == "input":
                    want = f"(B|1, {feat}) or " + want
            if not ok:
                raise ValueError(f"{kind}: the {site!r} mask has shape {list(m.shape)}; "
                                 f"expected {want}")  # fmt: skip

    # ---- forward ------------------------------------------------------------------------

    def forward(
        self,
        input: Tensor,
        hx: Tensor | tuple[Tensor, Tensor] | None = None,
        *,
        masks: CellMasks | None = None,
        return_output: bool = False,
    ):
        kind = type(self).__name__
        if input.dim() not in (1, 2):
            raise ValueError(f"{kind}: Expected input to be 1D or 2D, got {input.dim()}D instead")
        state = self._check_hx(hx)
        if self.dropout.output > 0 and not return_output:
            raise ValueError(
                f"{kind}: output={self.dropout.output} masks the cell's output, not the state "
                "it carries to the next step: call cell(x, hx, return_output=True), which "
                "returns (output, state), and feed the state back"
            )
        batched = input.dim() == 2
        x = input if batched else input.unsqueeze(0)
        B = x.shape[0]
        if state is None:
            zeros = torch.zeros(B, self.hidden_size, dtype=x.dtype, device=x.device)
            state = (zeros,) * (2 if self.cell.has_cell else 1)
        else:
            for idx, s in enumerate(state):
                if s.dim() != input.dim():
                    raise RuntimeError(
                        f"{kind}: hx[{idx}] is {s.dim()}-D but the input is {input.dim()}-D: "
                        "batched (B, I) input takes (B, H) states, unbatched (I,) input (H,)"
                    )
            if not batched:
                state = tuple(s.unsqueeze(0) for s in state)
        self._check_sizes(x, state)
        sample = self.sampling
        draws, acts_in_eval, kept, drawn = self._plan()
        self._refuse_frozen_masks(draws)  # under jit.trace
        if not (draws if sample else acts_in_eval):  # nothing acts: torch's op
            new = self._fused(x, state)
            if self.record_masks:
                self.last_masks = {}
            return self._result(new[0], new, batched, return_output)
        seq = self._sequence_masks(masks, B, x, hx is None) if sample else None
        missing = [] if seq is None else [s for s in kept if getattr(seq, s) is None]
        # the sequence's first call reads the masks it keeps back from the record
        record: dict[str, Tensor] | None = {} if self.record_masks or missing else None
        given = None if seq is None else seq._recorded()
        # under torch.compile a draw is an opaque call: all of a call's in one, so that the
        # step stays one graph (a call that draws nothing is traced through)
        opaque = sample and torch.compiler.is_compiling() and bool(drawn)
        if opaque and seq is not None:
            opaque = any(getattr(seq, s) is None for s in drawn)
        resolve = _call_masks_opaque if opaque else _call_masks
        xm, step, w_mask, scale, out_mask = resolve(self, x, sample, record, given)
        if w_mask is None and scale == 1 and all(m is None for m in step.tensors()):
            new = self._fused(xm, state)  # no mask inside the step: torch's op
        else:
            new = self._step(xm, state, step, w_mask, scale)
        out = new[0] if out_mask is None else new[0] * out_mask
        for site in missing:  # the sequence keeps what its first call drew
            setattr(seq, site, _cell_layout(site, record[_record_name(site)]))
        if self.record_masks:
            self.last_masks = record  # exactly this call's masks (none drawn: empty)
        return self._result(out, new, batched, return_output)

    def _result(self, out: Tensor, new: tuple[Tensor, ...], batched: bool, return_output: bool):
        """What a call returns: the state as torch's cell does, with the output first if
        asked for."""
        if not batched:
            out, new = out.squeeze(0), tuple(s.squeeze(0) for s in new)
        result = new if self.cell.has_cell else new[0]
        return (out, result) if return_output else result

    def __prepare_scriptable__(self) -> nn.Module:
        """``torch.jit.script`` calls this first: refuse with the alternatives."""
        raise script_refusal(self)

    def _check_hx(self, hx) -> tuple[Tensor, ...] | None:
        kind = type(self).__name__
        if hx is None:
            return None
        if self.cell.has_cell:
            if isinstance(hx, Tensor) or len(hx) != 2:
                raise RuntimeError(f"{kind}: hx must be a tuple (h_0, c_0)")
            state = tuple(hx)
            for idx, value in enumerate(state):
                if value.dim() not in (1, 2):
                    raise ValueError(
                        f"{kind}: Expected hx[{idx}] to be 1D or 2D, got {value.dim()}D instead"
                    )
            return state
        if not isinstance(hx, Tensor):
            raise RuntimeError(f"{kind}: hx must be a tensor h_0, got {type(hx).__name__}")
        if hx.dim() not in (1, 2):
            raise ValueError(f"{kind}: Expected hidden to be 1D or 2D, got {hx.dim()}D instead")
        return (hx,)

    def _check_sizes(self, x: Tensor, state: tuple[Tensor, ...]) -> None:
        """ATen's checks of a cell's input and state (its messages), for the unfused path."""
        if x.size(1) != self.input_size:
            raise RuntimeError(
                f"input has inconsistent input_size: got {x.size(1)} expected {self.input_size}"
            )
        for idx, s in enumerate(state):
            if s.size(0) != x.size(0):
                raise RuntimeError(
                    f"Input batch size {x.size(0)} doesn't match hidden{idx} batch size {s.size(0)}"
                )
            if s.size(1) != self.hidden_size:
                raise RuntimeError(
                    f"hidden{idx} has inconsistent hidden_size: got {s.size(1)}, expected "
                    f"{self.hidden_size}"
                )

    def _fused(self, x: Tensor, state: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        """torch's own cell op (``_VF.lstm_cell``, ...) with its module's arguments."""
        raise NotImplementedError

    def _step(self, x: Tensor, state: tuple[Tensor, ...], m: LayerMasks, w_mask: Tensor | None,
              scale: float) -> tuple[Tensor, ...]:  # fmt: skip
        """One step with masks inside it: the gates as the layer's loop forms them (per-gate
        input masks, ``h_{t-1}`` masked per gate group into ``W_hh`` dropped by ``w_mask``),
        then the cell's ``step_forward`` out of place, so autograd differentiates it.

        ``m``: the step's :class:`~rnndrop.kernels.LayerMasks`; ``scale``: classic scaling's
        expectation on ``h_{t-1}`` in eval (:meth:`ForwardMasks.recurrent_scale`).
        """
        cell, h = self.cell, state[0]
        # each bias rides its GEMM: the sum is cell.split_bias's, the GRU keeps b_hh apart
        a = _input_gates(x, self.weight_ih, self.bias_ih, m.input)
        hm = h.unsqueeze(0) if m.recurrent is None else h.unsqueeze(0) * m.recurrent
        rec = _recurrent_gates(hm if scale == 1 else hm * scale, self.weight_hh, w_mask,
                               self.bias_hh)  # fmt: skip
        if not cell.split_recurrent:  # the recurrent product goes into the gates
            a, rec = a + rec, None
        new = cell.step_forward(a, rec, State(*state), m)
        return (new.h, new.c) if cell.has_cell else (new.h,)


def _call_masks(cell: StepCellBase, x: Tensor, sample: bool, record, given):
    """The masks of one call of ``cell`` from the layers' :class:`ForwardMasks` (one step):
    ``(x masked by tied masks, the step's LayerMasks, the weight-drop mask, the eval scale
    on h_{t-1}, the output mask)``."""
    fm = cell._forward_masks(x.shape[0], x, sample, record, given)
    w_mask = fm.weight_hh_mask(0, 0, tuple(cell.weight_hh.shape))
    masks = fm.loop_masks(0, 0, None, cell.cell.has_cell)
    xm, masks.input = fm.input(0, x.unsqueeze(0))
    out_mask = fm.output_mask(cell.hidden_size)
    if isinstance(out_mask, Tensor):
        out_mask = out_mask.squeeze(0)
    return xm.squeeze(0), masks.at(0), w_mask, fm.recurrent_scale(), out_mask


_call_masks_opaque = torch.compiler.disable(_call_masks)


#: CellMasks' sites, in order, and their names in a layer's record (layer 0, forward)
_MASK_SITES: tuple[str, ...] = tuple(
    f.name for f in dataclasses.fields(CellMasks) if f.name != "batch_size"
)
_RECORD_NAMES = {site: "output" if site == "output" else site_name(site, 0) for site in _MASK_SITES}


def _same(checked: tuple | None, key: tuple) -> bool:
    """``key`` is what ``checked`` was: the same config and masks (identity), batch size,
    dtype and device (equality: ``x.device`` is a new object at every call)."""
    if checked is None or len(checked) != len(key) or checked[0] is not key[0]:
        return False
    return checked[1:4] == key[1:4] and all(a is b for a, b in zip(checked[4:], key[4:],
                                                                 strict=True))  # fmt: skip


def _record_name(site: str) -> str:
    """The layer's recorded name of a cell's site (layer 0, forward direction)."""
    return _RECORD_NAMES[site]


def _time_dim(site: str, m: Tensor) -> int | None:
    """The time dim of a mask in the layer's recorded layout (untied input ``(G, T, B, I)``:
    1), or None (``weight_hh`` has none)."""
    if site == "weight_hh":
        return None
    return 1 if site == "input" and m.dim() == 4 else 0


def _recorded_layout(site: str, m: Tensor) -> Tensor:
    """A :class:`CellMasks` mask in the layer's recorded layout: a time dim of 1."""
    if site == "weight_hh":
        return m
    return m.unsqueeze(1) if site == "input" and m.dim() == 3 else m.unsqueeze(0)


def _cell_layout(site: str, m: Tensor) -> Tensor:
    """A recorded mask of one step (time dim of 1) in :class:`CellMasks`' layout."""
    time_dim = _time_dim(site, m)
    return m if time_dim is None else m.squeeze(time_dim)


class LSTMCell(StepCellBase):
    r"""A drop-in ``torch.nn.LSTMCell`` carrying every recurrent dropout scheme.

    One step of :class:`rnndrop.nn.LSTM` (Hochreiter & Schmidhuber 1997; torch's gate order
    i, f, g, o) with the masks of :class:`~rnndrop.config.RecurrentDropout`::

        x̃          = x ⊙ m^x
        i, f, g, o  = σ, σ, tanh, σ (W_ih x̃ + b_ih + (W_hh ⊙ M)(h ⊙ m^h) + b_hh)
        c̃'         = m^c ⊙ (f ⊙ c + i ⊙ (g ⊙ m^g))
        h̃'         = o ⊙ tanh(c̃')
        c'          = d^c ⊙ c + (1 - d^c) ⊙ c̃'
        h'          = d^h ⊙ h + (1 - d^h) ⊙ h̃'
        output      = h' ⊙ m^o                  (returned with ``return_output=True``)

    ``m^x``, ``m^h``: input and recurrent masks (Gal & Ghahramani 2016; one per gate block
    when untied); ``M``: weight drop (Merity et al. 2017); ``m^g``: candidate (Semeniuta et
    al. 2016); ``m^c``: cell (Moon et al. 2015); ``d^c``, ``d^h``: zoneout, 1 = keep the
    previous value (Krueger et al. 2016); ``m^o``: output. An absent site is 1 (``d``: 0).

    Parameter names, shapes, initialisation and state_dicts are ``torch.nn.LSTMCell``'s
    (they load both ways); with no site acting in a call, ``torch._VF.lstm_cell`` runs with
    ``nn.LSTMCell``'s arguments (bitwise equal outputs and gradients). Per-sequence masks
    (a :meth:`sequence` scope or ``masks=``), eval and MC modes, recording:
    :class:`StepCellBase`. ``zoneout_*`` and per-step masks are drawn at every call::

        masks = cell.sample_masks(B)                  # or: with cell.sequence(): ...
        h = c = None
        for x_t in x:
            h, c = cell(x_t, None if h is None else (h, c), masks=masks)

    Args:
        input_size: features of ``x``.
        hidden_size: features of ``h`` and ``c``.
        bias: use ``b_ih`` and ``b_hh``.
        device, dtype: of the parameters.
        dropout: a :class:`~rnndrop.config.RecurrentDropout`, a dict of its fields or a
            preset name (``between_layers`` is ignored, with a warning).

    Shape:
        - input: ``(B, I)`` or ``(I,)`` unbatched.
        - hx: optional ``(h, c)``, each ``(B, H)`` (``(H,)`` unbatched); zeros if absent
          (a new sequence).
        - masks: optional :class:`CellMasks` of the sequence.
        - returns ``(h', c')`` as hx; with ``return_output=True``, ``(output, (h', c'))``,
          ``output`` ``(B, H)`` (``(H,)``).
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        dropout: DropoutSpec = None,
    ) -> None:
        super().__init__(LSTM_CELL, input_size, hidden_size, bias, device, dtype, dropout)

    def _fused(self, x: Tensor, state: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        return tuple(
            _VF.lstm_cell(x, state, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)
        )


class GRUCell(StepCellBase):
    r"""A drop-in ``torch.nn.GRUCell`` carrying every recurrent dropout scheme that means
    something for a GRU.

    One step of :class:`rnndrop.nn.GRU` (Cho et al. 2014; torch's gate order r, z, n) with
    the masks of :class:`~rnndrop.config.RecurrentDropout`::

        x̃      = x ⊙ m^x
        hp      = (W_hh ⊙ M)(h ⊙ m^h) + b_hh
        r, z    = σ(W_ir x̃ + b_ir + hp_r), σ(W_iz x̃ + b_iz + hp_z)
        n       = tanh(W_in x̃ + b_in + r ⊙ hp_n)
        h̃'     = (1 - z) ⊙ (n ⊙ m^n) + z ⊙ h
        h'      = d^h ⊙ h + (1 - d^h) ⊙ h̃'
        output  = h' ⊙ m^o                      (returned with ``return_output=True``)

    ``m^x``, ``m^h``: input and recurrent masks (Gal & Ghahramani 2016; one per gate block
    r, z, n when untied); ``M``: weight drop (Merity et al. 2017); ``m^n``: candidate
    (Semeniuta et al. 2016); ``d^h``: zoneout, 1 = keep the previous value (Krueger et al.
    2016); ``m^o``: output. An absent site is 1 (``d``: 0).

    The recurrent mask acts where ``h`` enters ``W_hh``, never in the carry ``z ⊙ h``. A GRU
    has no cell state: ``cell`` or ``zoneout_cell > 0`` raises a ``ValueError``. Parameter
    names, shapes, initialisation and state_dicts are ``torch.nn.GRUCell``'s; with no site
    acting in a call, ``torch._VF.gru_cell`` runs with ``nn.GRUCell``'s arguments (bitwise
    equal).
    Per-sequence masks (a :meth:`sequence` scope or ``masks=``), eval and MC modes, recording:
    :class:`StepCellBase`.

    Args:
        input_size: features of ``x``.
        hidden_size: features of ``h``.
        bias: use ``b_ih`` and ``b_hh``.
        device, dtype: of the parameters.
        dropout: a :class:`~rnndrop.config.RecurrentDropout`, a dict of its fields or a
            preset name (``between_layers`` is ignored, with a warning).

    Shape:
        - input: ``(B, I)`` or ``(I,)`` unbatched.
        - hx: optional ``h`` ``(B, H)`` (``(H,)`` unbatched); zeros if absent (a new
          sequence).
        - masks: optional :class:`CellMasks` of the sequence.
        - returns ``h'`` as hx; with ``return_output=True``, ``(output, h')``.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        dropout: DropoutSpec = None,
    ) -> None:
        super().__init__(GRU_CELL, input_size, hidden_size, bias, device, dtype, dropout)

    def _fused(self, x: Tensor, state: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        h = _VF.gru_cell(x, state[0], self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)
        return (h,)
