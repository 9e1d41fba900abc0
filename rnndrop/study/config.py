"""What a long-range study is: the grid (scheme x rate x distance x seed) and the budget."""

from __future__ import annotations

import dataclasses
import inspect
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import PRESETS, RecurrentDropout, TransformerDropout, as_dropout
from ..models.encoders import ENCODERS, RECURRENT_CELLS
from .base import V1_DROPOUT_FIELDS, Study, run_label
from .common import read_settings

__all__ = [
    "BUILTIN_SCHEMES",
    "Cell",
    "LongRangeRun",
    "StudyConfig",
    "check_model_settings",
    "load_study",
    "preset_scheme",
    "resolve_scheme",
    "uses_rate",
]

FORMAT = 1  # bump when a cell's results would no longer be comparable

# A scheme: the encoder ("lstm", "gru" or "transformer"), its dropout, and optionally model
# settings that override the study's `model` for this scheme. For an LSTM or GRU, `dropout` is
# anything rnndrop.config.as_dropout takes (a dict of RecurrentDropout fields, a preset name,
# {"preset": name, **arguments}, a float); for the transformer, a dict of TransformerDropout
# fields. In a dict, "p" stands for the swept rate ("p/10", "p*2" also work); `dropout: p` is
# the swept rate as a float. Schemes without "p" run once, whatever the rates.


def preset_scheme(preset: str, encoder: str = "lstm", **fixed: Any) -> dict[str, Any]:
    """The study's scheme for a :class:`~rnndrop.config.RecurrentDropout` preset at rate ``p``.

    "``preset`` at rate p" is the preset's constructor with ``p`` for each of its positional
    (rate) arguments, the keyword-only ones at their defaults: ``variational(p)``,
    ``zoneout(hidden=p, cell=p)``, ``awd(dropoute=p, dropouti=p, dropouth=p, dropout=p,
    wdrop=p)``; ``none()`` has no rate. ``fixed`` sets arguments to fixed values
    (``tied=False``; ``cell=0.0`` for the GRU's zoneout).
    """
    params = inspect.signature(getattr(RecurrentDropout, preset)).parameters.values()
    rates = {q.name: "p" for q in params if q.kind is q.POSITIONAL_OR_KEYWORD}
    return {"encoder": encoder, "dropout": {"preset": preset, **rates, **fixed}}


def _recurrent_schemes(encoder: str, prefix: str) -> dict[str, dict[str, Any]]:
    """Every preset of :data:`rnndrop.config.PRESETS` that means something for one cell (a
    preset whose site the cell lacks, as Moon et al.'s cell dropout for the GRU, has no
    scheme), plus untied variational."""
    schemes = {}
    for preset in PRESETS:
        try:
            RecurrentDropout.preset(preset, for_cell=encoder).check_cell(encoder)
        except ValueError:
            continue
        # zoneout's `cell` rate acts on the LSTM's c; a GRU has no cell state: hidden only
        fixed = {"cell": 0.0} if (encoder, preset) == ("gru", "zoneout") else {}
        schemes[prefix + preset] = preset_scheme(preset, encoder, **fixed)
        if preset == "variational":
            schemes[prefix + "variational_untied"] = preset_scheme(preset, encoder, tied=False)
    return schemes


_TRANSFORMER = {"num_layers": 2}  # a one-layer LSTM's match: attention needs depth to copy
BUILTIN_SCHEMES: dict[str, dict[str, Any]] = {
    **_recurrent_schemes("lstm", ""),
    **_recurrent_schemes("gru", "gru_"),
    "transformer_none": {"encoder": "transformer", "dropout": {}, "model": _TRANSFORMER},
    "transformer_attention": {"encoder": "transformer", "dropout": {"attention": "p"},
                              "model": _TRANSFORMER},
    "transformer_residual": {"encoder": "transformer", "dropout": {"residual": "p"},
                              "model": _TRANSFORMER},
    "transformer_ffn": {"encoder": "transformer", "dropout": {"ffn": "p"},
                              "model": _TRANSFORMER},
    "transformer_drop_path": {"encoder": "transformer", "dropout": {"drop_path": "p"},
                              "model": _TRANSFORMER},
    "transformer_standard": {"encoder": "transformer", "dropout": {
        "embedding": "p", "attention": "p", "residual": "p"}, "model": _TRANSFORMER},
}  # fmt: skip


_PLACEHOLDER = re.compile(r"^p\s*(?:([*/])\s*([0-9.]+(?:[eE][-+]?[0-9]+)?))?$")


def _is_placeholder(value: Any) -> bool:
    return isinstance(value, str) and _PLACEHOLDER.match(value.strip()) is not None


def _substitute(value: Any, p: float | None) -> Any:
    """``"p"``, ``"p*k"`` or ``"p/k"`` becomes the rate (times / divided by ``k``)."""
    if not _is_placeholder(value):
        return value
    if p is None:
        raise ValueError("internal: a rate placeholder without a rate")
    op, num = _PLACEHOLDER.match(value.strip()).groups()
    if op is None:
        return p
    return p * float(num) if op == "*" else p / float(num)


def uses_rate(spec: Mapping[str, Any]) -> bool:
    """True if the scheme's dropout names the swept rate (runs once per rate)."""
    dropout = spec.get("dropout")
    if isinstance(dropout, Mapping):
        return any(_is_placeholder(v) for v in dropout.values())
    return _is_placeholder(dropout)


def resolve_scheme(
    spec: Mapping[str, Any], p: float | None
) -> tuple[str, RecurrentDropout | TransformerDropout]:
    """``(encoder, dropout config)`` for a scheme at rate ``p``, validated.

    An LSTM or GRU scheme's dropout goes through :func:`rnndrop.config.as_dropout`, the path
    every model takes; a site the cell lacks (``zoneout_cell`` for the GRU) is an error here,
    before any cell runs, as it is for :class:`rnndrop.nn.GRU`.
    """
    unknown = sorted(set(spec) - {"encoder", "dropout", "model"})
    if unknown:
        raise ValueError(f"scheme keys {unknown} unknown; a scheme has encoder, dropout, model")
    check_model_settings(spec.get("model", {}), "the scheme's model")
    encoder = spec.get("encoder", "lstm")
    if encoder not in ENCODERS:
        raise ValueError(f"scheme encoder must be one of {list(ENCODERS)}, got {encoder!r}")
    dropout = spec.get("dropout")
    if isinstance(dropout, Mapping):
        dropout = {k: _substitute(v, p) for k, v in dropout.items()}
    else:
        dropout = _substitute(dropout, p)
    if encoder not in RECURRENT_CELLS:
        if not isinstance(dropout, Mapping | None):
            raise ValueError(f"a transformer scheme's dropout is a dict of TransformerDropout "
                             f"fields, got {dropout!r}")  # fmt: skip
        return encoder, TransformerDropout.from_dict(dropout or {})
    config = as_dropout(dropout, encoder)  # raises naming a bad field, preset or rate
    config.check_cell(encoder)
    return encoder, config


def check_schemes(schemes: list[str], custom_schemes: Mapping[str, Any]) -> None:
    """Every scheme named is built in or defined under ``custom_schemes``."""
    unknown = [s for s in schemes if s not in custom_schemes and s not in BUILTIN_SCHEMES]
    if unknown:
        raise ValueError(f"unknown scheme(s) {unknown}; built in: {sorted(BUILTIN_SCHEMES)}; "
                         "or define them under custom_schemes")  # fmt: skip


@dataclass(frozen=True)
class LongRangeRun:
    """One run of the long-range grid (formerly ``Cell``: a cell of the grid, not a recurrent
    cell). ``task`` is the task's label in a study of several tasks."""

    scheme: str
    rate: float | None
    distance: int
    seed: int
    task: str | None = None

    @property
    def label(self) -> str:
        """Scheme with its rate, e.g. ``variational_p0.25``."""
        return run_label(self.scheme, self.rate)

    def __str__(self) -> str:
        where = "" if self.task is None else f"{self.task} "
        return f"{where}{self.label} d={self.distance} seed={self.seed}"


Cell = LongRangeRun  # the name before study v3's base class (kept: code imports it)


# what an entry of StudyConfig.tasks sets; train_size makes the data regime a per-task axis:
# label the same task twice (`recall`, `recall_n256`) for the unlimited and a scarce regime;
# rates: the task's own rates, or {distance: rates} for a rate sweep at some distances only
TASK_KEYS = ("task", "task_args", "distances", "train_size", "rates")


@dataclass
class StudyConfig(Study):
    """A long-range study: schemes x rates x distances x seeds on one or more synthetic tasks.

    Each cell trains a fresh :class:`~rnndrop.models.SequenceModel` for the same budget
    (``steps`` optimiser steps of ``batch_size`` new samples) and is then evaluated on
    ``eval_size`` held-out samples, deterministically and with ``mc_samples`` MC passes.

    One task: ``task``, ``task_args`` and ``distances``. Several: ``tasks`` maps a label to
    ``{task, task_args, distances}`` (``task`` defaults to the label), each task with its own
    distance grid; every other setting is shared. ``variants`` adds schemes on another model:
    ``{h128: {model: {hidden_size: 128}, schemes: [none, variational]}}`` adds
    ``none_h128`` and ``variational_h128``.

    A task's ``rates`` replaces the study's for that task; a mapping ``{distance: rates}``
    replaces them at those distances only, so a rate sweep can run at one distance while
    the other distances run the study's rates: ``rates: [0.25]`` with a task's
    ``rates: {10: [0.1, 0.25, 0.5]}`` sweeps three rates at d = 10 and runs 0.25 elsewhere
    (a third of the cells of the full rate x distance grid).

    The data regime: ``train_size: null`` (the default) draws fresh sequences for every step
    (``steps * batch_size`` distinct ones: nothing can overfit); ``train_size: N`` trains on a
    fixed, seeded set of N sequences, epoch after epoch, and evaluates on held-out sequences of
    the same distribution (the val and test splits, whose seeds never meet the training
    set's). Every cell records its train score beside the held-out one. Set per task under
    ``tasks`` to run several regimes in one study. A scheme is compared with the scheme without
    dropout on the same encoder and model (``none`` for the LSTM, ``none_h128`` for the
    variant), seed by seed: same data, same order, same initial weights.
    """

    # the fields of Study (name, schemes, rates, seeds, custom_schemes, model, steps,
    # batch_size, optimizer, lr, gradient_clip_val, out_dir) at its defaults, except these
    name: str = "long_range"  # the study's folder under out_dir
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    task: str = "copy"  # a key of rnndrop.data.synthetic.TASKS, e.g. copy, selective_copy
    task_args: dict[str, Any] = field(default_factory=dict)  # e.g. {n_copy: 1}
    distances: list[int] = field(default_factory=lambda: [10, 50, 100])
    val_every: int = 500  # validation (TensorBoard curves) every n steps
    eval_size: int = 1000  # held-out samples for the final evaluation
    mc_samples: int = 8  # MC dropout passes in the final evaluation (0: off)
    grad_distances: list[int] | None = None  # k for gradient norm through time
    report_grad_distance: int | None = None  # the report's gradient curves (default: middle d)
    solved_threshold: float = 0.9  # normalised accuracy that counts as solved
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)  # label -> task settings
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> model, schemes
    train_size: int | None = None  # None: fresh data every step; N: a fixed set of N sequences

    def __post_init__(self) -> None:
        check_schemes(self.schemes, self.custom_schemes)
        known = {**BUILTIN_SCHEMES, **self.custom_schemes}
        self._variant_schemes = self._expand_variants(known)
        self._label: str | None = None  # this task's label when made by for_task
        self._rates_at: dict[int, list[float]] = {}  # a task's {distance: rates} (for_task)
        self._check_tasks()
        if self.train_size is not None and (
            isinstance(self.train_size, bool)
            or not isinstance(self.train_size, int)
            or self.train_size < 1
        ):
            raise ValueError(f"train_size must be null (fresh data every step) or an integer "
                             f">= 1, got {self.train_size!r}")  # fmt: skip
        if not self.distances or any(d < 1 for d in self.distances):
            raise ValueError(f"distances must be positive integers, got {self.distances}")
        self._check_study(("steps", "batch_size", "eval_size"))

    def _expand_variants(self, known: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for name, variant in self.variants.items():
            if not isinstance(variant, Mapping) or set(variant) - {"model", "schemes"}:
                raise ValueError(f"variants.{name}: give {{model: {{...}}, schemes: [...]}}, "
                                 f"got {variant!r}")  # fmt: skip
            model = dict(variant.get("model") or {})
            check_model_settings(model, f"variants.{name}.model")
            for scheme in variant.get("schemes") or []:
                if scheme not in known:
                    raise ValueError(f"variants.{name}: unknown scheme {scheme!r}")
                spec = dict(known[scheme])
                spec["model"] = {**spec.get("model", {}), **model}
                label = f"{scheme}_{name}"
                if label in known or label in out:
                    raise ValueError(f"variants.{name}: scheme name {label!r} is taken")
                out[label] = spec
        return out

    def _check_tasks(self) -> None:
        for label, spec in self.tasks.items():
            if not isinstance(spec, Mapping) or set(spec) - set(TASK_KEYS):
                raise ValueError(f"tasks.{label}: give {{task, task_args, distances}}, got "
                                 f"{spec!r}")  # fmt: skip
            self.for_task(label)  # validates the distances

    def all_schemes(self) -> list[str]:
        """``schemes`` followed by the schemes ``variants`` adds."""
        return [*self.schemes, *self._variant_schemes]

    def scheme_spec(self, scheme: str) -> dict[str, Any]:
        """The scheme's definition (a variant's: its scheme on the variant's model)."""
        if scheme in self._variant_schemes:
            return self._variant_schemes[scheme]
        return super().scheme_spec(scheme)

    def task_labels(self) -> list[str]:
        """The tasks' labels; a one-task study's label is its task."""
        return list(self.tasks) if self.tasks else [self.task]

    def for_task(self, label: str) -> StudyConfig:
        """The one-task study of task ``label`` (itself for a one-task study)."""
        if not self.tasks:
            if label not in (None, self.task):
                raise ValueError(f"task {label!r} is not in this study (it runs {self.task})")
            return self
        if label not in self.tasks:
            raise ValueError(f"task {label!r} is not in this study; tasks: {list(self.tasks)}")
        # built and validated once per task (a report asks once per result); built again
        # when a setting of this study has changed since
        state = dataclasses.astuple(self)
        cache = self.__dict__.setdefault("_for_task", {})
        if label in cache and cache[label][0] == state:
            return cache[label][1]
        spec = {"task": label, **self.tasks[label]}
        rates = spec.pop("rates", None)
        at_distance: dict[int, list[float]] = {}
        if isinstance(rates, Mapping):
            at_distance = _rates_at(label, rates, spec.get("distances", self.distances))
            rates = None
        elif rates is not None and (not isinstance(rates, list) or not rates):
            raise ValueError(f"tasks.{label}.rates: give a list of rates or {{distance: [rates]}}, "
                             f"got {rates!r}")  # fmt: skip
        sub = dataclasses.replace(self, tasks={}, **spec, **({"rates": rates} if rates else {}))
        sub._label = label
        if at_distance:
            sub._rates_at = at_distance
            sub._check_all_schemes()  # the mapping's rates, checked before any run starts
        cache[label] = (state, sub)
        return sub

    def rates_for(self, scheme: str, distance: int | None = None) -> list[float | None]:
        """The rates a scheme runs at ``distance``; every rate the task runs when None."""
        rates = super().rates_for(scheme)
        if rates == [None] or not self._rates_at:
            return rates
        if distance is not None:
            return list(self._rates_at.get(distance, rates))
        return sorted({*rates, *(p for ps in self._rates_at.values() for p in ps)})

    def baseline(self, scheme: str) -> str | None:
        """The scheme a scheme is paired with: no dropout, same encoder and model settings.

        None for a scheme without dropout itself, or when the study runs no such scheme.
        """
        if _is_none(self, scheme):
            return None
        encoder = self.scheme_spec(scheme).get("encoder", "lstm")
        model = self.model_for(scheme)
        for other in self.all_schemes():
            spec = self.scheme_spec(other)
            if (_is_none(self, other) and spec.get("encoder", "lstm") == encoder
                    and self.model_for(other) == model):  # fmt: skip
                return other
        return None

    def cells(self) -> list[LongRangeRun]:
        """Every cell, in a fixed order (task, scheme, rate, distance, seed)."""
        if self.tasks:
            return [c for label in self.tasks for c in self.for_task(label).cells()]
        return [
            LongRangeRun(s, p, d, seed, self._label)
            for s in self.all_schemes()
            for p in self.rates_for(s)
            for d in self.distances
            if p in self.rates_for(s, d)
            for seed in self.seeds
        ]

    @property
    def study_root(self) -> Path:
        """``<out_dir>/<name>``: a study of several tasks writes its verdict here."""
        return Path(self.out_dir) / self.name

    @property
    def root(self) -> Path:
        """``<out_dir>/<name>/<task label>``: one task's cells and report."""
        return self.study_root / (self._label or self.task)

    def cell_dir(self, cell: LongRangeRun) -> Path:
        """``runs/<study>/<task>/<scheme>/d=<d>/seed=<s>`` (the rate is part of the scheme)."""
        if self.tasks:
            return self.for_task(cell.task).cell_dir(cell)
        return self.root / cell.label / f"d={cell.distance}" / f"seed={cell.seed}"

    def cell_spec(self, cell: LongRangeRun) -> dict[str, Any]:
        """Everything that determines a cell's result (hashed to recognise finished cells)."""
        if self.tasks:
            return self.for_task(cell.task).cell_spec(cell)
        encoder, dropout = resolve_scheme(self.scheme_spec(cell.scheme), cell.rate)
        train = {k: getattr(self, k) for k in ("steps", "batch_size", "optimizer", "lr",
                                                "gradient_clip_val", "val_every")}  # fmt: skip
        if self.train_size is not None:  # absent when unlimited: earlier hashes stay valid
            train["train_size"] = self.train_size
        evaluation = {k: getattr(self, k) for k in ("eval_size", "mc_samples", "grad_distances")}
        return {
            "format": FORMAT, "task": self.task, "task_args": self.task_args,
            "distance": cell.distance, "seed": cell.seed, "scheme": cell.scheme,
            "rate": cell.rate, "encoder": encoder, "dropout": self.dropout_spec(dropout),
            "model": self.model_for(cell.scheme),
            "train": train, "eval": evaluation,
        }  # fmt: skip


def _rates_at(label: str, rates: Mapping[Any, Any], distances: list[int]) -> dict[int, list[float]]:
    """A task's ``{distance: [rates]}``, checked: every distance is one of the task's."""
    out: dict[int, list[float]] = {}
    for key, ps in rates.items():
        d = key if isinstance(key, int) and not isinstance(key, bool) else None
        if d not in distances:
            raise ValueError(f"tasks.{label}.rates: {key!r} is not one of the task's distances "
                             f"{distances}; give {{distance: [rates]}}")  # fmt: skip
        if not isinstance(ps, list) or not ps:
            raise ValueError(f"tasks.{label}.rates.{d}: give a non-empty list of rates, got "
                             f"{ps!r}")  # fmt: skip
        out[d] = list(ps)
    return out


# RecurrentDropout's fields added after results were published, with their defaults: left out
# of a run's spec at those defaults, so the hashes (and finished runs) of earlier studies stay
# valid. Derived: every field not in base.V1_DROPOUT_FIELDS (a new site is one automatically).
_LATER_FIELDS = {f.name: f.default for f in dataclasses.fields(RecurrentDropout)
                 if f.name not in V1_DROPOUT_FIELDS}  # fmt: skip


def _hashed(dropout: dict[str, Any]) -> dict[str, Any]:
    """A dropout config's dict as a long-range or context run's spec holds it (for code that
    has the dict; :func:`rnndrop.study.base.dropout_spec` takes the config)."""
    return {k: v for k, v in dropout.items()
            if not (k in _LATER_FIELDS and v == _LATER_FIELDS[k])}  # fmt: skip


def _is_none(study: StudyConfig, scheme: str) -> bool:
    """True if the scheme has no dropout at any rate (it runs once)."""
    if uses_rate(study.scheme_spec(scheme)):
        return False
    _, dropout = resolve_scheme(study.scheme_spec(scheme), None)
    return all(getattr(dropout, rate) == 0 for rate in dropout._RATES)


def check_model_settings(model: Mapping[str, Any], where: str) -> None:
    """A study's (or a scheme's) model settings may not name what a scheme decides."""
    clash = sorted(set(model) & {"encoder", "dropout", "transformer_dropout"})
    if clash:
        raise ValueError(f"{where}: {clash} belong to a scheme (its encoder and dropout), not to "
                         "the model settings")  # fmt: skip


def load_study(path: str | Path | None = None, **overrides: Any) -> StudyConfig:
    """A study from a YAML file (keys as :class:`StudyConfig`'s fields) plus overrides."""
    data = read_settings(path, overrides, StudyConfig, StudyConfig._SETTINGS)
    # rates is both: the study's, and a task's own where it sets them
    if data.get("tasks") and (clash := [k for k in TASK_KEYS if k in data and k != "rates"]):
        raise ValueError(f"{clash}: a study with `tasks` sets these per task, under tasks.<label>")
    return StudyConfig(**data)
