"""Dropout schemes as data.

A scheme is one frozen :class:`RecurrentDropout`: a rate per *site* (where in the
recurrent layer the mask acts, one entry of :data:`SITES` each) plus a mask policy shared by
the sites. Named constructors build the schemes from the literature; every field can also be
set directly, from Python or from a YAML block. This module imports only the standard library.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import numbers
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal

__all__ = [
    "CONCRETE_RATE_BOUNDS",
    "PRESETS",
    "RATE_FIELDS",
    "SITES",
    "DropoutSpec",
    "RecurrentDropout",
    "Site",
    "TransformerDropout",
    "as_dropout",
    "check_rate",
    "is_preset",
]

TimePolicy = Literal["per_step", "per_sequence"]
BatchPolicy = Literal["per_sample", "per_batch"]
Scaling = Literal["inverted", "classic"]


@dataclass(frozen=True)
class Site:
    """What the engine needs to know of one dropout site of :class:`RecurrentDropout`.

    Attributes:
        path: where the site runs when its masks are drawn. ``"model"``: outside the
            recurrent layer (the embedding); ``"fused"``: beside the fused op (masks on its
            input or output, or a dropped weight); ``"fused_if_tied_or_folds"``: fused when
            tied, or when per-batch per-sequence (folded into ``W_ih``'s columns), else
            loop; ``"fused_if_folds"``: fused only when per-batch per-sequence (folded into
            ``W_hh``'s columns), else loop; ``"loop"``: needs the time loop, and so does its
            classic-scaling eval; ``"loop_always"``: needs the time loop in eval too
            (zoneout's expectation).
        policy: the ``time``/``batch`` policy applies to it.
        gated: ``tied`` applies to it (a mask per gate when untied).
        scaled: inverted/classic scaling applies to it.
        layers: ``"first"`` (layer 0 only), ``"inner"`` (layers 1...), ``"last"``, or ``"all"``.
        cells: the cells it means something for; None: every cell.
        lacks: with ``cells``, why another cell has no such site (the refusal's reason).
        doc: what it drops, for :class:`RecurrentDropout`'s docstring (its "Sites" list).
    """

    path: str
    policy: bool = True
    gated: bool = False
    scaled: bool = True
    layers: str = "all"
    cells: tuple[str, ...] | None = None
    lacks: str = ""
    doc: str = ""


#: The one list of sites: it drives the execution path, activity, the "no effect" warnings,
#: :data:`RATE_FIELDS` and the site lists of :class:`RecurrentDropout`'s docstring. A new
#: site is an entry here plus a ``float`` field of :class:`RecurrentDropout` in the same place
#: (checked when this module is imported).
SITES: dict[str, Site] = {
    "embedding": Site("model", policy=False, doc=(
        "whole word types (rows of the embedding matrix); used by "
        ":class:`rnndrop.nn.EmbeddingDropout` and the language model, not by the recurrent "
        "layer.")),
    "input": Site("fused_if_tied_or_folds", gated=True, layers="first",
                  doc="``x_t`` entering the first layer."),
    "between_layers": Site("fused_if_tied_or_folds", gated=True, layers="inner",
                           doc="``h_t`` of layer ``l`` where it enters layer ``l+1``."),
    "recurrent": Site("fused_if_folds", gated=True, doc=(
        "``h_{t-1}`` where it enters ``W_hh`` (not where it is the output, nor a GRU's carry "
        "``z ⊙ h_{t-1}``).")),
    "output": Site("fused", layers="last", doc="``h_t`` leaving the last layer."),
    "candidate": Site("loop", cells=("lstm", "gru", "layernorm_lstm"),
                      lacks="it has no gated candidate", doc=(
        "the candidate in the state update only: the LSTM's ``tanh(g)``, the GRU's ``n`` "
        "(Semeniuta et al. 2016).")),
    "cell": Site("loop", cells=("lstm", "layernorm_lstm"), lacks="it has no cell state", doc=(
        "the LSTM's new cell state, ``c_t = d(f ⊙ c_{t-1} + i ⊙ g)``, which is both carried "
        "and read by ``h_t = o ⊙ tanh(c_t)`` (Moon et al. 2015, RnnDrop). Per sequence and "
        "inverted, a kept unit's ``c`` is multiplied by ``1/(1-p)`` at every step and grows "
        "unless ``f < 1-p`` (Semeniuta et al. 2016's critique; ``candidate`` avoids it).")),
    "weight_hh": Site("fused", policy=False, doc=(
        "elements of ``W_hh`` (DropConnect), one mask per forward call, shared over time and "
        "batch (Merity et al. 2017).")),
    "zoneout_hidden": Site("loop_always", policy=False, scaled=False, doc=(
        "per unit and step, keep the previous ``h`` instead of the new one; eval uses the "
        "expectation ``z·prev + (1-z)·new`` (Krueger et al. 2016).")),
    "zoneout_cell": Site("loop_always", policy=False, scaled=False,
                         cells=("lstm", "layernorm_lstm"), lacks="it has no cell state",
                         doc="the same on the LSTM's cell state ``c`` (a GRU has none)."),
}  # fmt: skip

#: The dropout sites of :class:`RecurrentDropout` (its rate fields), in :data:`SITES`' order.
RATE_FIELDS: tuple[str, ...] = tuple(SITES)


def _site_names(**where: Any) -> list[str]:
    """The sites whose :class:`Site` entry matches ``where`` (``gated=True``...), in order."""
    return [n for n, s in SITES.items() if all(getattr(s, k) == v for k, v in where.items())]


def _listed(names: list[str], last: str = "and") -> str:
    """``a, b and c``."""
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} {last} {names[-1]}"


def _document_sites(doc: str) -> str:
    """``doc`` with its ``{sites}``, ``{policy_sites}`` and ``{gated_sites}`` filled from
    :data:`SITES` (``str.replace``: the rest of the docstring keeps its braces)."""
    import textwrap

    lines = []
    for name, site in SITES.items():
        lines += textwrap.wrap(f"{name}: {site.doc}", 88, initial_indent=" " * 8,
                               subsequent_indent=" " * 12)  # fmt: skip
    policy = [n for n in _site_names(policy=True) if SITES[n].path != "model"]
    return (doc.replace("{sites}", "\n".join(lines).strip())
            .replace("{policy_sites}", _listed(policy))
            .replace("{gated_sites}", _listed(_site_names(gated=True))))  # fmt: skip


#: The open interval learned concrete-dropout rates stay in (see :class:`RecurrentDropout`'s
#: ``concrete``): the rate is ``σ(b·tanh(θ/b))`` of its parameter ``θ``, ``b = logit(0.999)``.
#: Initial rates must lie strictly inside it.
CONCRETE_RATE_BOUNDS: tuple[float, float] = (0.001, 0.999)

_CHOICES: dict[str, tuple[str, ...]] = {
    "time": ("per_step", "per_sequence"),
    "batch": ("per_sample", "per_batch"),
    "embedding_batch": ("per_sample", "per_batch"),
    "scaling": ("inverted", "classic"),
}


def check_rate(name: str, p: Any) -> float:
    """Return ``p`` as a float, or raise ``ValueError`` naming ``name`` if it is not in [0, 1)."""
    if isinstance(p, bool) or not isinstance(p, numbers.Real):
        raise ValueError(f"{name} must be a number in [0, 1), got {p!r} ({type(p).__name__})")
    p = float(p)
    if not (0.0 <= p < 1.0) or math.isnan(p):
        hint = " (a rate of 1 drops everything; use a value below 1)" if p == 1.0 else ""
        raise ValueError(f"{name} must be in [0, 1), got {p}{hint}")
    return p


class _Rates:
    """What the dropout configs share: validated rates, dict round trip, a summary."""

    _RATES: tuple[str, ...] = ()

    def _check_rates(self) -> None:
        for name in self._RATES:
            object.__setattr__(self, name, check_rate(name, getattr(self, name)))

    def to_dict(self) -> dict[str, Any]:
        """A plain dict (for YAML, JSON and checkpoints); :meth:`from_dict` inverts it."""
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]):
        """Build from a dict; unknown keys raise ``ValueError`` listing the valid ones."""
        if isinstance(data, cls):
            return data
        known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"{cls.__name__}: unknown field(s) {unknown}; valid fields are {sorted(known)}"
            )
        return cls(**dict(data))

    def replace(self, **changes: Any):
        """A copy with some fields changed (validated like the original)."""
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]

    @property
    def any(self) -> bool:
        """True if any site has a non-zero rate."""
        return any(getattr(self, n) > 0 for n in self._RATES)

    def _rates_text(self) -> str:
        return ", ".join(f"{n}={getattr(self, n):g}" for n in self._RATES if getattr(self, n))


@dataclass(frozen=True)
class RecurrentDropout(_Rates):
    r"""Where and how a recurrent layer (LSTM, GRU) drops units.

    LSTM step (torch's gate order i, f, g, o; the GRU's is in :class:`rnndrop.nn.GRU`)::

        i, f, g, o = W_ih x_t + b_ih + W_hh h_{t-1} + b_hh
        c_t = σ(f) ⊙ c_{t-1} + σ(i) ⊙ tanh(g)
        h_t = σ(o) ⊙ tanh(c_t)

    Each site below has its own rate ``p`` in [0, 1). With ``scaling="inverted"``
    (default) kept values are multiplied by ``1/(1-p)`` in training and eval is the
    identity; with ``scaling="classic"`` (Srivastava et al. 2014) training masks are
    0/1 and eval multiplies by ``1-p``. Zoneout never rescales.

    Sites (from :data:`SITES`, in field order):
        {sites}

    Mask policy (for {policy_sites}):
        time: ``"per_sequence"`` (one mask shared by all steps: variational / locked)
            or ``"per_step"`` (a fresh mask every step).
        batch: ``"per_sample"`` (each sequence its own mask) or ``"per_batch"`` (one
            mask for the batch; recurrent per-batch per-sequence masks then run on the
            fused kernel, folded into the columns of ``W_hh``).
        tied: one mask for all the gates (``True``) or one per gate (``False``, Gal's
            untied form) on {gated_sites}.
        embedding_batch: the batch policy of the embedding site (AWD: ``"per_batch"``).
        scaling: ``"inverted"`` or ``"classic"``.

    Zoneout masks are always drawn per step and per sample, as in Krueger et al.

    Concrete dropout (Gal, Hron & Kendall 2017):
        concrete: learn the rate of every site of the layer that has one. The rates given
            are the initial values of per-site parameters of :class:`rnndrop.nn.LSTM` /
            :class:`~rnndrop.nn.GRU` (``dropout_logit_<site>``, one per site, shared by the
            layers and directions); sites at 0 stay off. In training the masks are relaxed
            Bernoulli (concrete) samples, ``z = σ((logit p + log u - log(1-u)) / t)``,
            ``u ~ U(0, 1)``, keep ``= (1 - z)/(1 - p)`` (zoneout's weight of the previous
            value is ``z`` itself, with ``p`` its rate), so the loss has a gradient in the
            rates; eval uses the learned rates (deterministic, or hard Bernoulli masks in
            MC mode). Needs ``scaling="inverted"``; the ``embedding`` site lives outside the
            layer and keeps its fixed rate. Rates stay in :data:`CONCRETE_RATE_BOUNDS`. The
            paper's regulariser: :meth:`rnndrop.nn.RNNBase.concrete_regularizer`.
        temperature: ``t`` of the relaxation (0.1, as in the paper).
    """

    # the rates: one field per entry of SITES, in its order (what each drops: SITES' doc)
    embedding: float = 0.0
    input: float = 0.0
    between_layers: float = 0.0
    recurrent: float = 0.0
    output: float = 0.0
    candidate: float = 0.0
    cell: float = 0.0
    weight_hh: float = 0.0
    zoneout_hidden: float = 0.0
    zoneout_cell: float = 0.0
    time: TimePolicy = "per_sequence"  # mask shared over time, or fresh each step
    batch: BatchPolicy = "per_sample"  # mask per sequence, or one for the batch
    tied: bool = True  # one mask for all gates, or one per gate
    embedding_batch: BatchPolicy = "per_batch"  # word-type mask shared by the batch?
    scaling: Scaling = "inverted"  # 1/(1-p) in training, or ×(1-p) at test
    concrete: bool = False  # learn the rates (concrete dropout, Gal et al. 2017)
    temperature: float = 0.1  # of the concrete relaxation

    _RATES = RATE_FIELDS

    def __post_init__(self) -> None:
        self._check_rates()
        self._check_concrete()
        for name, choices in _CHOICES.items():
            value = getattr(self, name)
            if value not in choices:
                raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
        if not isinstance(self.tied, bool):
            raise ValueError(f"tied must be True or False, got {self.tied!r}")
        self._warn_no_effect()

    def _check_concrete(self) -> None:
        if not isinstance(self.concrete, bool):
            raise ValueError(f"concrete must be True or False, got {self.concrete!r}")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, numbers.Real) or not (0 < float(t) < math.inf):
            raise ValueError(f"temperature must be a positive number, got {t!r}")
        object.__setattr__(self, "temperature", float(t))
        if not self.concrete:
            return
        if self.scaling != "inverted":
            raise ValueError(
                "concrete=True learns rates under inverted scaling (kept values × 1/(1-p)); "
                f"scaling={self.scaling!r} is not supported with it"
            )
        lo, hi = CONCRETE_RATE_BOUNDS
        bad = [f"{n}={getattr(self, n):g}" for n in self.concrete_sites
               if not lo < getattr(self, n) < hi]  # fmt: skip
        if bad:
            raise ValueError(
                f"concrete=True: initial rates must be 0 (site off) or in ({lo}, {hi}); got "
                + ", ".join(bad)
            )

    # -- derived views -------------------------------------------------------------

    @property
    def concrete_sites(self) -> list[str]:
        """Sites whose rate is learned with ``concrete=True``: the layer's sites with a rate."""
        return [n for n in self.active_sites() if SITES[n].path != "model"]

    def active_sites(self, **where: Any) -> list[str]:
        """Sites with a non-zero rate whose :class:`Site` entry matches ``where``."""
        return [
            n
            for n, site in SITES.items()
            if getattr(self, n) > 0 and all(getattr(site, k) == v for k, v in where.items())
        ]

    def check_cell(self, cell: str, owner: str = "") -> None:
        """Raise ``ValueError`` if a site with a rate has no meaning for ``cell`` (``"gru"``...)."""
        lacking = [n for n in self.active_sites()
                   if SITES[n].cells is not None and cell not in SITES[n].cells]  # fmt: skip
        if lacking:
            names = ", ".join(f"{n}={getattr(self, n):g}" for n in lacking)
            why = "; ".join(SITES[n].lacks for n in lacking)
            hint = " (zoneout_hidden acts on h)" if "zoneout_cell" in lacking else ""
            raise ValueError(
                f"{owner + ': ' if owner else ''}the dropout site(s) {names} have no meaning "
                f"for a {cell.upper()} ({why}); set them to 0{hint}"
            )

    def warn_model_sites(self, owner: str, stacklevel: int = 2) -> None:
        """Warn that the ``embedding`` rate does nothing in ``owner``, a bare layer or cell.

        The embedding site drops word types of the model's embedding
        (:class:`rnndrop.nn.EmbeddingDropout`, :class:`rnndrop.models.LanguageModel`); a
        recurrent layer given it alone would show the rate in its repr and apply nothing.
        """
        if self.embedding > 0:
            warnings.warn(
                f"{owner}: embedding={self.embedding:g} has no effect here: it drops word types "
                "of a model's embedding (rnndrop.nn.EmbeddingDropout, or "
                "rnndrop.models.LanguageModel, which applies it), not inside a recurrent layer",
                UserWarning,
                stacklevel=stacklevel + 1,
            )

    @property
    def gate_sites(self) -> bool:
        """True if a site that ``tied`` affects is active."""
        return bool(self.active_sites(gated=True))

    @property
    def masked_sites(self) -> bool:
        """True if a site that ``time``/``batch`` affect is active (in the layer)."""
        return any(SITES[n].path != "model" for n in self.active_sites(policy=True))

    def _warn_no_effect(self) -> None:
        defaults = {f.name: f.default for f in fields(self)}
        idle = []
        if not self.tied and not self.gate_sites:
            idle.append(f"tied=False (no {_listed(_site_names(gated=True), 'or')} rate is set)")
        for name in ("time", "batch"):
            if getattr(self, name) != defaults[name] and not self.masked_sites:
                idle.append(f"{name}={getattr(self, name)!r} (no masked site has a rate)")
        if self.embedding_batch != defaults["embedding_batch"] and self.embedding == 0:
            idle.append("embedding_batch (embedding rate is 0)")
        if self.temperature != defaults["temperature"] and not self.concrete:
            idle.append("temperature (concrete is off)")
        if self.concrete and not self.concrete_sites:
            idle.append("concrete=True (no site of the layer has a rate to learn)")
        if self.scaling == "classic" and not self.active_sites(scaled=True):
            idle.append("scaling='classic' (only zoneout is set, and zoneout never rescales)")
        if idle:
            warnings.warn(
                "RecurrentDropout: these settings have no effect: " + "; ".join(idle),
                UserWarning,
                stacklevel=4,
            )

    # -- serialisation -------------------------------------------------------------

    def describe(self) -> str:
        """Short human-readable summary: the non-zero rates and the policy."""
        rates = self._rates_text()
        if not rates:
            return "none"
        policy = f"{self.time}, {self.batch}" + ("" if self.tied else ", untied")
        if self.scaling != "inverted":
            policy += f", {self.scaling}"
        if self.concrete:
            policy += f", concrete t={self.temperature:g}"
        return f"{rates} [{policy}]"

    # -- the schemes of the literature ---------------------------------------------

    @classmethod
    def none(cls) -> RecurrentDropout:
        """No dropout anywhere: the layer is a plain ``torch.nn.LSTM`` / ``GRU``."""
        return cls()

    @classmethod
    def naive(
        cls, p: float = 0.5, *, embedding: float = 0.0, concrete: bool = False,
        temperature: float = 0.1,
    ) -> RecurrentDropout:  # fmt: skip
        """Zaremba, Sutskever & Vinyals 2014, "Recurrent neural network regularization".

        Dropout on the non-recurrent connections only (input, between layers,
        output), a fresh mask at every step; the recurrence is left intact.
        PTB medium used ``p=0.5``, large ``p=0.65``.
        """
        return cls(
            embedding=embedding,
            input=p,
            between_layers=p,
            output=p,
            time="per_step",
            concrete=concrete,
            temperature=temperature,
        )

    @classmethod
    def naive_recurrent(
        cls, p: float = 0.5, *, recurrent: float | None = None, concrete: bool = False,
        temperature: float = 0.1,
    ) -> RecurrentDropout:  # fmt: skip
        """Per-step masks on ``h_{t-1}`` as well as on the non-recurrent connections.

        The scheme Zaremba et al. and Gal & Ghahramani warn against: a fresh mask on
        the recurrence every step injects noise that compounds over time. Kept
        because measuring that damage is the point of a long-range study.
        """
        return cls(
            input=p,
            between_layers=p,
            output=p,
            recurrent=p if recurrent is None else recurrent,
            time="per_step",
            concrete=concrete,
            temperature=temperature,
        )

    @classmethod
    def variational(
        cls,
        p: float = 0.25,
        *,
        recurrent: float | None = None,
        embedding: float = 0.0,
        tied: bool = True,
        concrete: bool = False,
        temperature: float = 0.1,
    ) -> RecurrentDropout:
        """Gal & Ghahramani 2016, "A theoretically grounded application of dropout in RNNs".

        One mask per sequence, shared by every step, on the inputs, between layers,
        the recurrent ``h_{t-1}`` and the outputs (``z_t ⊙ m``, the same ``m`` for all
        ``t``). ``tied=False`` draws a separate mask for each gate (the paper's
        "untied" LSTM). PTB medium: ``p=0.5`` (untied ``recurrent=0.2``), embedding 0.2.
        """
        return cls(
            embedding=embedding,
            input=p,
            between_layers=p,
            output=p,
            recurrent=p if recurrent is None else recurrent,
            time="per_sequence",
            tied=tied,
            concrete=concrete,
            temperature=temperature,
        )

    @classmethod
    def zoneout(
        cls, hidden: float = 0.05, cell: float = 0.5, *, concrete: bool = False,
        temperature: float = 0.1,
    ) -> RecurrentDropout:  # fmt: skip
        """Krueger et al. 2016, "Zoneout: regularizing RNNs by randomly preserving hidden
        activations".

        ``c_t = d^c ⊙ c_{t-1} + (1-d^c) ⊙ c̃_t``, ``h_t = d^h ⊙ h_{t-1} + (1-d^h) ⊙ o_t ⊙ tanh(c̃_t)``
        with ``d ~ Bernoulli(z)`` per unit and step; eval uses ``E[d] = z``.
        The paper's char-PTB setting is ``hidden=0.05, cell=0.5``.
        """
        return cls(zoneout_hidden=hidden, zoneout_cell=cell, concrete=concrete,
                   temperature=temperature)  # fmt: skip

    @classmethod
    def weight_drop(
        cls, p: float = 0.5, *, concrete: bool = False, temperature: float = 0.1
    ) -> RecurrentDropout:
        """Merity, Keskar & Socher 2017 (AWD-LSTM) weight drop: DropConnect on ``W_hh``.

        One mask over the elements of ``W_hh`` per forward call, shared by every step
        and sequence, so the fused kernel runs unchanged.
        """
        return cls(weight_hh=p, concrete=concrete, temperature=temperature)

    @classmethod
    def semeniuta(
        cls, p: float = 0.25, *, time: TimePolicy = "per_step", concrete: bool = False,
        temperature: float = 0.1,
    ) -> RecurrentDropout:  # fmt: skip
        """Semeniuta, Severyn & Barth 2016, "Recurrent dropout without memory loss".

        ``c_t = f ⊙ c_{t-1} + i ⊙ d(g)``: only the candidate update is dropped, so
        the memory ``c_{t-1}`` itself is never erased. The paper found per-step masks
        work here (``time="per_step"``) because the cell path is untouched.
        """
        return cls(candidate=p, time=time, concrete=concrete, temperature=temperature)

    @classmethod
    def moon(
        cls, p: float = 0.25, *, time: TimePolicy = "per_sequence", concrete: bool = False,
        temperature: float = 0.1,
    ) -> RecurrentDropout:  # fmt: skip
        """Moon, Choi, Lee & Song 2015, "RnnDrop: a novel dropout for RNNs in ASR" (ASRU).

        ``c_t = d(f ⊙ c_{t-1} + i ⊙ g)``, ``h_t = o ⊙ tanh(c_t)``: dropout on the LSTM's
        memory cell, the masked ``c_t`` carried to the next step and read by ``h_t``, with
        one mask per sequence (the paper's; ``time="per_step"`` for a fresh one per step).
        Only cells with a cell state have the site (LSTM, LayerNorm LSTM; a GRU refuses it).

        Caveat: with a per-sequence mask and inverted scaling a kept unit's cell is
        multiplied by ``1/(1-p)`` at every step, so it grows unless ``f_t < 1-p``
        (Semeniuta et al. 2016's critique of it; their :meth:`semeniuta` masks only the
        candidate and avoids it). ``scaling="classic"`` keeps 0/1 masks in training and
        multiplies ``c_t`` by ``1-p`` at every step in eval instead.
        """
        return cls(cell=p, time=time, concrete=concrete, temperature=temperature)

    @classmethod
    def awd(
        cls,
        dropoute: float = 0.1,
        dropouti: float = 0.65,
        dropouth: float = 0.3,
        dropout: float = 0.4,
        wdrop: float = 0.5,
        *,
        concrete: bool = False,
        temperature: float = 0.1,
    ) -> RecurrentDropout:
        """Merity, Keskar & Socher 2017, "Regularizing and optimizing LSTM language models".

        AWD-LSTM's flags map onto sites: ``dropoute → embedding`` (word types, one
        mask for the batch), ``dropouti → input``, ``dropouth → between_layers``,
        ``dropout → output`` (all "locked": one mask per sequence) and
        ``wdrop → weight_hh``. Defaults are awd-lstm-lm's ``main.py`` defaults; its
        README uses ``dropouti=0.4, dropouth=0.25`` for PTB and ``dropouth=0.2`` for
        WikiText-2.
        """
        return cls(
            embedding=dropoute,
            input=dropouti,
            between_layers=dropouth,
            output=dropout,
            weight_hh=wdrop,
            time="per_sequence",
            batch="per_sample",
            embedding_batch="per_batch",
            concrete=concrete,
            temperature=temperature,
        )

    @classmethod
    def preset(cls, name: str, *, for_cell: str | None = None, **kwargs: Any) -> RecurrentDropout:
        """Build a named scheme: ``RecurrentDropout.preset("variational", p=0.3)``.

        Args:
            name: one of :data:`PRESETS`.
            for_cell: ``"lstm"`` or ``"gru"``, to read the preset for that cell: a default that
                sets a site the cell lacks is dropped (zoneout on a GRU is its hidden-state
                rate: ``zoneout_cell`` stays 0 unless ``cell=`` is passed to the preset, which
                then raises where the GRU is built). ``None``: the LSTM's reading.
            kwargs: the preset's arguments; an unknown one raises a ``ValueError`` that
                lists them.
        """
        if name not in PRESETS:
            raise ValueError(f"unknown dropout preset {name!r}; choose from {sorted(PRESETS)}")
        build = getattr(cls, name)
        takes = list(inspect.signature(build).parameters)
        unknown = sorted(set(kwargs) - set(takes))
        if unknown:
            raise ValueError(
                f"dropout preset {name!r} takes the argument(s) {takes}"
                + ("" if takes else " (none)")
                + f"; got unknown {unknown}"
            )
        defaults = _CELL_PRESET_DEFAULTS.get((name, for_cell), {})
        return build(**{**defaults, **kwargs})


def _check_rate_fields(cls: type) -> None:
    """Fill ``cls``'s docstring from :data:`SITES`; raise if its rate fields do not match it.

    A site added to :data:`SITES` without its field (or a field without its entry, or the two
    in another order) fails at import, before anything can run with a half-declared site.
    """
    unexplained = [n for n, site in SITES.items() if site.cells is not None and not site.lacks]
    if unexplained:  # check_cell's refusal names the reason
        raise TypeError(f"SITES {unexplained} list their cells but not `lacks`, why the others "
                        "have no such site")  # fmt: skip
    names = [f.name for f in fields(cls)]
    if tuple(names[: len(SITES)]) != RATE_FIELDS or any(
        f.type not in ("float", float) or f.default != 0.0 for f in fields(cls)[: len(SITES)]
    ):
        raise TypeError(f"{cls.__name__}'s first fields must be the rates of SITES, in order, "
                        f"each `float = 0.0`: {list(SITES)}; got {names}")  # fmt: skip
    if cls.__doc__:  # None under python -OO
        cls.__doc__ = _document_sites(cls.__doc__)


_check_rate_fields(RecurrentDropout)


PRESETS: tuple[str, ...] = (
    "none",
    "naive",
    "naive_recurrent",
    "variational",
    "zoneout",
    "weight_drop",
    "semeniuta",
    "awd",
    "moon",
)


#: A preset's defaults that set a site a cell lacks, replaced when it is read for that cell
#: (``RecurrentDropout.preset(name, for_cell=...)``): Krueger et al.'s GRU zoneout acts on ``h``.
_CELL_PRESET_DEFAULTS: dict[tuple[str, str | None], dict[str, Any]] = {
    ("zoneout", "gru"): {"cell": 0.0},
    ("zoneout", "rnn"): {"cell": 0.0},  # the models' encoder name for the tanh RNN
    ("zoneout", "rnn_tanh"): {"cell": 0.0},
    ("zoneout", "rnn_relu"): {"cell": 0.0},
}


# float before str: jsonargparse tries the members in order, and "0.3" must parse as a float
DropoutSpec = RecurrentDropout | Mapping[str, Any] | float | str | None


def is_preset(dropout: DropoutSpec) -> bool:
    """True if ``dropout`` names a preset (``"variational"``, ``{"preset": ...}``)."""
    return isinstance(dropout, str) or (isinstance(dropout, Mapping) and "preset" in dropout)


def as_dropout(dropout: DropoutSpec, cell: str | None = None) -> RecurrentDropout:
    """Turn what users pass as ``dropout`` into a :class:`RecurrentDropout`, once.

    Accepts a config, a dict of its fields (``{"preset": "variational", "p": 0.3}`` builds
    a preset with arguments), a preset name (``"variational"``), ``None`` (no dropout) or a
    float, which means what it means for ``torch.nn.LSTM``/``GRU``: per-step dropout on the
    outputs of every layer but the last (``0.0``: no dropout at all).

    Args:
        dropout: what the user passed.
        cell: ``"lstm"`` / ``"gru"``: read a preset for that cell (``GRU(dropout="zoneout")``
            is zoneout on ``h``; see :meth:`RecurrentDropout.preset`).
    """
    if dropout is None:
        return RecurrentDropout()
    if isinstance(dropout, RecurrentDropout):
        return dropout
    if isinstance(dropout, str):
        return RecurrentDropout.preset(dropout, for_cell=cell)
    if isinstance(dropout, Mapping):
        if "preset" in dropout:
            args = {k: v for k, v in dropout.items() if k != "preset"}
            return RecurrentDropout.preset(dropout["preset"], for_cell=cell, **args)
        return RecurrentDropout.from_dict(dropout)
    if isinstance(dropout, numbers.Real) and not isinstance(dropout, bool):
        p = check_rate("dropout", dropout)
        return RecurrentDropout(between_layers=p, time="per_step") if p else RecurrentDropout()
    raise TypeError(
        "dropout must be a RecurrentDropout, a dict of its fields, a preset name, a float or "
        f"None; got {type(dropout).__name__}"
    )


@dataclass(frozen=True)
class TransformerDropout(_Rates):
    r"""Where a causal pre-norm transformer drops units.

    One block (Vaswani et al. 2017, pre-norm as in GPT-2)::

        x = x + DropPath(Drop_res(Attn(LN(x))))       Attn's softmax(QKᵀ/√d) → Drop_att
        x = x + DropPath(Drop_res(W_2 Drop_ffn(GELU(W_1 LN(x)))))

    All dropout is inverted (1/(1-p) in training, identity in eval) and per element, except
    DropPath, which drops a whole residual branch per sample (Huang et al. 2016).

    Sites:
        embedding: the sum of token and position embeddings entering the first block.
        attention: the attention probabilities (``dropout_p`` of scaled dot-product
            attention, in training and MC mode only).
        residual: each branch's output before it is added back (after attention and after
            the FFN).
        ffn: the FFN's hidden activation.
        drop_path: the largest DropPath rate; block ``l`` of ``L`` uses
            ``drop_path · l / (L - 1)`` (linear depth schedule, 0 for the first block).
    """

    embedding: float = 0.0  # token + position embeddings
    attention: float = 0.0  # attention probabilities
    residual: float = 0.0  # branch outputs before the residual add
    ffn: float = 0.0  # FFN hidden activation
    drop_path: float = 0.0  # stochastic depth, largest rate (last block)

    _RATES = ("embedding", "attention", "residual", "ffn", "drop_path")

    def __post_init__(self) -> None:
        self._check_rates()

    def describe(self) -> str:
        """Short human-readable summary: the non-zero rates."""
        return self._rates_text() or "none"

    def drop_path_rate(self, block: int, num_blocks: int) -> float:
        """DropPath rate of ``block`` (0-based) under the linear depth schedule."""
        return 0.0 if num_blocks <= 1 else self.drop_path * block / (num_blocks - 1)

    @classmethod
    def none(cls) -> TransformerDropout:
        """No dropout anywhere."""
        return cls()

    @classmethod
    def standard(cls, p: float = 0.1) -> TransformerDropout:
        """Vaswani et al. 2017 / GPT-2: ``p`` on embeddings, attention and residual branches."""
        return cls(embedding=p, attention=p, residual=p)
