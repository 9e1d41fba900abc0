"""Where a recurrent layer's masks come from: one place that draws every mask of a forward call.

:class:`ForwardMasks` turns a :class:`~rnndrop.config.RecurrentDropout` into the
tensors each site needs for one call, following the policy (per step or per
sequence, per sample or per batch, tied or per gate, inverted or classic scaling),
and, when asked, records them under their site names for inspection and statistics.
:func:`needs_loop` and :func:`is_active` decide the execution path.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from ..config import SITES, RecurrentDropout
from ..functional import bernoulli_mask, concrete_mask, draw_seed, seeded_mask
from ..kernels.contract import LayerMasks
from .workspace import WeightBuffers, masked_weight

__all__ = ["ForwardMasks", "is_active", "needs_loop"]


def _layer_sites(cfg: RecurrentDropout, layer: int | None, num_layers: int) -> list[str]:
    """Active sites of the layer (``None``: of any layer of the stack), model sites aside."""
    names = []
    for name in cfg.active_sites():
        where = SITES[name].layers
        if SITES[name].path == "model" or (where == "inner" and num_layers < 2):
            continue
        if layer is None or where in ("all", "last") or (where == "first") == (layer == 0):
            names.append(name)
    return names


def is_active(cfg: RecurrentDropout, num_layers: int, sample: bool) -> bool:
    """True if the config changes anything in a forward with (``sample``) or without masks."""
    names = _layer_sites(cfg, None, num_layers)
    if any(SITES[n].path == "loop_always" for n in names):
        return True
    return bool(names) and (sample or cfg.scaling == "classic")


def folds(cfg: RecurrentDropout) -> bool:
    """Masks constant over time and batch fold into a weight's columns (fused path)."""
    return cfg.time == "per_sequence" and cfg.batch == "per_batch"


def needs_loop(cfg: RecurrentDropout, layer: int, sample: bool, num_layers: int = 2) -> bool:
    """True if this layer must run the time loop instead of the fused op (see ``SITES``)."""
    for name in _layer_sites(cfg, layer, num_layers):
        path = SITES[name].path
        if path == "loop_always":
            return True
        if not sample:
            if path == "loop" and cfg.scaling == "classic":
                return True
        elif (
            path == "loop"
            or (path == "fused_if_folds" and not folds(cfg))
            or (path == "fused_if_tied_or_folds" and not cfg.tied and not folds(cfg))
        ):
            return True
    return False


def site_name(site: str, layer: int, direction: int = 0) -> str:
    """Key of a recorded mask, e.g. ``recurrent/l1_reverse``."""
    return f"{site}/l{layer}" + ("_reverse" if direction else "")


def _key(site: str, layer: int, direction: int = 0) -> tuple[str, int, int]:
    """A mask's key before it is recorded: the string (:func:`site_name`) is only built when
    masks are recorded (under torch.compile, formatting a traced int breaks the graph)."""
    return (site, layer, direction)


class ForwardMasks:
    """The masks of one forward call of a recurrent layer or step cell (any cell).

    Recorded masks, by site name (see :func:`site_name`), broadcast against:
    ``input``/``between_layers`` ``(T, B, F)`` tied or ``(G, T, B, F)`` untied (one per
    gate); ``recurrent`` ``(T, Gr, B, H)`` (``Gr`` 1 tied, ``G`` untied); ``candidate``
    and ``cell`` ``(T, B, H)``; ``zoneout_*`` ``(T, B, H)`` (1 = keep the previous value);
    ``weight_hh`` ``(G·H, H)``; ``output`` ``(T, B, F)``. Size-1 dims are shared (per sequence / per
    batch). ``G`` is the cell's gate count (4 LSTM, 3 GRU, 1 Elman RNN).

    A step cell (:class:`~rnndrop.nn.stepcells.StepCellBase`) is one step of a one-layer
    layer: it draws its masks here with ``T = 1`` and ``fold=False``, hands the masks it
    keeps for a sequence back in as ``given``, and takes the weight-drop mask as a tensor
    (:meth:`weight_hh_mask`).

    Concrete dropout: the sites in ``learned`` take their rate from its logit (a 0-dim
    tensor); with ``relaxed`` (training) their masks are :func:`~rnndrop.functional.
    concrete_mask` samples, differentiable in the logit; otherwise (MC, eval) they are drawn
    or taken in expectation at the learned rate, as fixed rates are.

    Args:
        cfg: the scheme.
        T, B: steps and batch size of the call.
        hidden_size: ``H``.
        like: a tensor whose device and dtype the masks take.
        sample: draw masks (training or MC) or use their expectations.
        record: a dict to store every mask under its site name, or None.
        buffers: the module's pool for per-call weights (see :mod:`rnndrop.nn.workspace`).
        gates: the cell's gate count ``G``.
        learned: site name -> logit of its learned rate (concrete dropout), or None.
        relaxed: draw the learned sites' masks relaxed (training), not hard (MC).
        out_size: features of ``h`` where they differ from ``hidden_size`` (an LSTM's
            ``proj_size``): the recurrent and ``zoneout_hidden`` masks act on ``h``.
        given: masks to use instead of drawing, by recorded name (``recurrent/l0``), in
            the recorded layout; recorded like drawn ones.
        fold: fold masks constant over time and batch into the weights' columns (the
            fused path); False keeps them masks (a step cell always runs its step).
    """

    def __init__(
        self,
        cfg: RecurrentDropout,
        T: int,
        B: int,
        hidden_size: int,
        like: Tensor,
        sample: bool,
        record: dict[str, Tensor] | None = None,
        buffers: WeightBuffers | None = None,
        gates: int = 4,
        learned: dict[str, Tensor] | None = None,
        relaxed: bool = False,
        out_size: int | None = None,
        given: Mapping[str, Tensor] | None = None,
        fold: bool = True,
    ) -> None:
        self.G = gates
        self.cfg, self.T, self.B, self.H, self.sample = cfg, T, B, hidden_size, sample
        self.P = out_size or hidden_size  # features of h (proj_size with projections)
        self.device, self.dtype = like.device, like.dtype
        self.scale = cfg.scaling == "inverted"
        self.Tm = T if cfg.time == "per_step" else 1
        self.Bm = B if cfg.batch == "per_sample" else 1
        self.folds = fold and folds(cfg)
        self.given = given or {}
        self.record = record
        self.learned = learned or {}
        self.relaxed = bool(relaxed and sample and self.learned)
        # pooled weights (MaskedWeight) pass no gradient to folded masks: plain ops instead
        self.buffers = None if self.relaxed else buffers

    # ---- drawing ------------------------------------------------------------------

    def _rate(self, site: str) -> float:
        """The site's rate now: the config's, or the learned one (concrete dropout)."""
        logit = self.learned.get(site)
        return getattr(self.cfg, site) if logit is None else float(torch.sigmoid(logit))

    def _relaxed(self, site: str, shape: tuple[int, ...], keep: bool = True) -> Tensor | None:
        """A concrete mask of a learned site in training, else None."""
        logit = self.learned.get(site)
        if logit is None or not self.relaxed:
            return None
        logit = logit.to(self.dtype)
        return concrete_mask(logit, shape, self.cfg.temperature, keep=keep, scale=self.scale)

    def _given(self, name: str | tuple) -> Tensor | None:
        if not self.given:  # (no name built: see _key)
            return None
        return self.given.get(site_name(*name) if isinstance(name, tuple) else name)

    def _draw(self, name: str | tuple, p: float, shape: tuple[int, ...]) -> Tensor:
        given = self._given(name)
        if given is not None:
            return self._keep(name, given)
        site = name[0] if isinstance(name, tuple) else name
        m = self._relaxed(site, shape)
        if m is None:
            if site in self.learned:
                p = self._rate(site)
            m = bernoulli_mask(shape, p, scale=self.scale, device=self.device, dtype=self.dtype)
        return self._keep(name, m)

    def _keep(self, name: str | tuple, m: Tensor) -> Tensor:
        if self.record is not None:
            # detached: a relaxed (concrete) mask would otherwise keep this forward's graph
            # alive in last_masks, and a module holding non-leaf tensors cannot be deep-copied
            self.record[site_name(*name) if isinstance(name, tuple) else name] = m.detach()
        return m

    def _policy(self, name: str, p: float, *lead: int, features: int) -> Tensor:
        """A mask broadcastable to ``(*lead, T, B, features)`` under the config's policy."""
        return self._draw(name, p, (*lead, self.Tm, self.Bm, features))

    def _full(self, value: float, features: int | None = None) -> Tensor:
        shape = (1, self.B, features or self.H)
        return torch.full(shape, value, device=self.device, dtype=self.dtype)

    # ---- sites ----------------------------------------------------------------------

    def input_rate(self, layer: int) -> float:
        """Rate of the input (layer 0) or between-layers site, 0 if it does nothing now."""
        p = self.cfg.input if layer == 0 else self.cfg.between_layers
        return p if (self.sample or self.cfg.scaling == "classic") else 0.0

    def input(self, layer: int, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """Mask the layer's input.

        Returns ``(x, gate_masks)``: tied masks are applied to ``x`` here; untied ones
        come back as ``(G, 1, F)`` column masks for ``W_ih`` (per-batch per-sequence) or
        ``(G, T|1, B|1, F)`` per-gate masks for the loop layer.
        """
        p = self.input_rate(layer)
        if p == 0:
            return x, None
        if not self.sample:
            return x * (1 - p), None
        name = _key("input" if layer == 0 else "between_layers", layer)
        features = x.shape[-1]
        if self.folds and not self.cfg.tied:  # recorded as (G, 1, 1, F) like per-gate masks
            return x, self._draw(name, p, (self.G, 1, 1, features)).view(self.G, 1, features)
        m = self._policy(name, p, *(() if self.cfg.tied else (self.G,)), features=features)
        # tied (T, B, F) masks x here; per-gate (G, T, B, F) ones go to the loop
        return (x * m, None) if m.dim() == x.dim() else (x, m)

    def weight_ih(self, layer: int, d: int, w_ih: Tensor, fold: Tensor | None) -> Tensor:
        """``W_ih`` with untied per-batch input masks ``(G, 1, F)`` folded into its columns."""
        return masked_weight(w_ih, fold=fold, buffers=self.buffers, key=("ih", layer, d))

    def weight_hh_mask(self, layer: int, d: int, shape: tuple[int, ...]) -> Tensor | None:
        """The weight-drop mask on ``W_hh`` as a tensor (``shape``; None if not sampling or
        off): a step cell keeps it for a sequence and applies it itself. A layer's is
        rebuilt from a seed instead (:meth:`weight_hh`)."""
        if self.cfg.weight_hh == 0 or not self.sample:
            return None
        return self._draw(_key("weight_hh", layer, d), self.cfg.weight_hh, tuple(shape))

    def recurrent_scale(self) -> float:
        """What multiplies ``h_{t-1}`` where it enters ``W_hh`` when nothing is sampled:
        the classic-scaling expectation ``(1 - recurrent)(1 - weight_hh)`` of its masks (a
        step cell; :meth:`weight_hh` folds the same factors into a layer's weight), else 1."""
        c = self.cfg
        if self.sample or c.scaling != "classic":
            return 1.0
        return (1 - c.recurrent) * (1 - c.weight_hh)

    def weight_hh(self, layer: int, d: int, w_hh: Tensor) -> Tensor:
        """``W_hh`` as this call uses it: weight drop, folded recurrent masks, classic scaling."""
        c = self.cfg
        seed = fold = None
        p_w = c.weight_hh
        if c.weight_hh > 0:
            relaxed = self._relaxed("weight_hh", tuple(w_hh.shape)) if self.sample else None
            if relaxed is not None:  # an explicit mask: its gradient reaches the rate
                w_hh = w_hh * self._keep(_key("weight_hh", layer, d), relaxed)
            elif self.sample:
                p_w = self._rate("weight_hh")
                seed = draw_seed(None)  # the mask is rebuilt from it, never stored
                if self.record is not None:
                    self._keep(
                        _key("weight_hh", layer, d),
                        seeded_mask(w_hh.shape, p_w, seed, scale=self.scale,
                                    device=self.device, dtype=self.dtype),
                    )  # fmt: skip
            elif c.scaling == "classic":
                w_hh = w_hh * (1 - c.weight_hh)
        if c.recurrent > 0:
            if self.sample and self.folds:
                G = 1 if c.tied else self.G
                name = _key("recurrent", layer, d)  # recorded as (1, G, 1, H) like the loop
                fold = self._draw(name, c.recurrent, (1, G, 1, w_hh.shape[1])).view(G, 1, -1)
            elif not self.sample and c.scaling == "classic":
                w_hh = w_hh * (1 - c.recurrent)
        return masked_weight(
            w_hh, p=p_w, seed=seed, scale=self.scale, fold=fold,
            buffers=self.buffers, key=("hh", layer, d),
        )  # fmt: skip

    def recurrent(self, layer: int, d: int) -> Tensor | None:
        """``(T|1, G, B, H)`` mask on ``h_{t-1}`` for the loop (None if folded or absent)."""
        c = self.cfg
        if c.recurrent == 0 or not self.sample or self.folds:
            return None
        G = 1 if c.tied else self.G
        m = self._draw(_key("recurrent", layer, d), c.recurrent, (self.Tm, G, self.Bm, self.P))
        if m.shape[2] == self.B:
            return m
        return m.expand(self.Tm, m.shape[1], self.B, self.P)  # a given mask may be per gate

    def candidate(self, layer: int, d: int) -> Tensor | None:
        """``(T|1, B, H)`` mask on the candidate (LSTM ``tanh(g)``, GRU ``n``)."""
        return self._unit_mask("candidate", layer, d)

    def cell(self, layer: int, d: int) -> Tensor | None:
        """``(T|1, B, H)`` mask on the new cell state ``c̃_t`` (Moon et al. 2015)."""
        return self._unit_mask("cell", layer, d)

    def _unit_mask(self, site: str, layer: int, d: int) -> Tensor | None:
        """A policy site's ``(T|1, B, H)`` mask on ``H`` units inside the step: drawn when
        sampling, classic scaling's ``1 - p`` in eval, else None."""
        p = getattr(self.cfg, site)
        if p == 0:
            return None
        if self.sample:
            name = _key(site, layer, d)
            return self._policy(name, p, features=self.H).expand(self.Tm, self.B, -1)
        return self._full(1 - p) if self.cfg.scaling == "classic" else None

    def zoneout(self, kind: str, layer: int, d: int, pad: Tensor | None) -> Tensor | None:
        """Weight of the previous value: 0/1 ~ Bernoulli(z) sampled, z otherwise, 1 past the end.

        Args:
            kind: ``"hidden"`` or ``"cell"``.
            pad: ``(T, B, 1)`` bool, true past each sequence's length (packed input).
        """
        site = f"zoneout_{kind}"
        F = self.P if kind == "hidden" else self.H  # h has proj_size features
        z = getattr(self.cfg, site)
        logit = self.learned.get(site)
        if z == 0:
            m = None
        elif self.sample and self._given(_key(site, layer, d)) is not None:
            m = self._keep(_key(site, layer, d), self._given(_key(site, layer, d)))
        elif self.sample:  # bernoulli_mask is 1 with prob 1 - z: its complement is d
            shape = (self.T, self.B, F)
            m = self._relaxed(site, shape, keep=False)
            if m is None:
                z = self._rate(site)
                keep_new = bernoulli_mask(shape, z, scale=False, device=self.device,
                                          dtype=self.dtype)  # fmt: skip
                m = 1 - keep_new
            m = self._keep(_key(site, layer, d), m)
        elif logit is not None:  # the expectation at the learned rate (no gradient in eval)
            m = torch.sigmoid(logit.detach()).to(self.dtype).expand(1, self.B, F)
        else:
            m = self._full(z, F)
        if pad is None:
            return m
        if m is None:
            return pad.expand(self.T, self.B, F).to(self.dtype)
        return torch.where(pad, torch.ones((), dtype=self.dtype, device=self.device), m)

    def loop_masks(self, layer: int, d: int, in_mask: Tensor | None, has_cell: bool,
                   pad: Tensor | None = None) -> LayerMasks:  # fmt: skip
        """The :class:`~rnndrop.kernels.LayerMasks` of one layer and direction's loop.

        Args:
            in_mask: the untied per-gate input masks :meth:`input` returned (not folded).
            has_cell: the cell carries ``c`` (``cell`` and ``zoneout_cell`` apply).
            pad: as in :meth:`zoneout`.
        """
        return LayerMasks(
            input=in_mask,
            recurrent=self.recurrent(layer, d),
            candidate=self.candidate(layer, d),
            cell=self.cell(layer, d) if has_cell else None,
            zoneout_h=self.zoneout("hidden", layer, d, pad),
            zoneout_c=self.zoneout("cell", layer, d, pad) if has_cell else None,
        )

    def draw(self, site: str, features: int, layer: int = 0, d: int = 0) -> Tensor:
        """A sampled mask of ``site`` alone, in its recorded layout (drawn under the
        policy, or given): what the methods above draw for it. For a step cell's masks
        drawn outside a call (:meth:`~rnndrop.nn.stepcells.StepCellBase.sample_masks`).

        Args:
            site: a per-sequence site (``input``, ``recurrent``, ``candidate``, ``cell``,
                ``output``, ``weight_hh``).
            features: of the tensor it masks (``input``: the layer's input; ``weight_hh``:
                the columns of ``W_hh``).
        """
        c = self.cfg
        if site == "input":
            lead = () if c.tied else (self.G,)
            return self._policy(_key(site, layer), c.input, *lead, features=features)
        if site == "recurrent":
            shape = (self.Tm, 1 if c.tied else self.G, self.Bm, features)
            return self._draw(_key(site, layer, d), c.recurrent, shape)
        if site == "weight_hh":
            return self._draw(_key(site, layer, d), c.weight_hh, (self.G * self.H, features))
        name = "output" if site == "output" else _key(site, layer, d)
        return self._policy(name, getattr(c, site), features=features)

    def output(self, out: Tensor) -> Tensor:
        """Output dropout on the last layer's ``h`` sequence."""
        m = self.output_mask(out.shape[-1])
        return out if m is None else out * m

    def output_mask(self, features: int) -> Tensor | float | None:
        """What :meth:`output` multiplies by: a ``(T|1, B|1, F)`` mask (sampling), classic
        scaling's ``1 - p`` (eval), or None."""
        p = self.cfg.output
        if p == 0:
            return None
        if not self.sample:
            return 1 - p if self.cfg.scaling == "classic" else None
        return self._policy("output", p, features=features)
