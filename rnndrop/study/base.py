"""What every study is: schemes x rates x seeds, a budget, a hash per run, saved results.

:class:`Study` is the base of the long-range (:class:`~rnndrop.study.StudyConfig`), context
(:class:`~rnndrop.study.context.ContextStudyConfig`) and inference
(:class:`~rnndrop.study.inference.InferenceStudyConfig`) studies: the fields they share, their
validation, the run's hash and result loading. A *run* is one point of a study's grid (a scheme
at a rate, a seed, ...): one model trained and evaluated. The studies called it a "cell" (a cell
of the grid, not a recurrent cell); the old names stay as aliases.

A run's hash decides whether a finished run is reused, and published results
(``docs/results/*``) carry it: the hash formulas here are frozen (see :func:`dropout_spec`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from ..config import RecurrentDropout, TransformerDropout
from .common import read_settings

__all__ = [
    "RESULT",
    "V1_DROPOUT_FIELDS",
    "Run",
    "Study",
    "dropout_spec",
    "run_label",
    "spec_hash",
]

RESULT = "result.json"  # a finished run's result, in its run directory

#: The fields of :class:`~rnndrop.config.RecurrentDropout` when the first study results were
#: published, in a cell's spec at whatever value they have. Frozen: a field added since (a new
#: site, ``concrete``...) is in a run's spec only when it differs from its default, so the runs
#: before it keep their hashes. Its default must therefore do what the runs before it did.
V1_DROPOUT_FIELDS: tuple[str, ...] = (
    "embedding", "input", "between_layers", "recurrent", "output", "candidate", "weight_hh",
    "zoneout_hidden", "zoneout_cell", "time", "batch", "tied", "embedding_batch", "scaling",
)  # fmt: skip


def dropout_spec(
    dropout: RecurrentDropout | TransformerDropout,
    published: tuple[str, ...] = V1_DROPOUT_FIELDS,
) -> dict[str, Any]:
    """A scheme's dropout as a run's spec holds it (hashed).

    Every field of a :class:`~rnndrop.config.TransformerDropout`; of a
    :class:`~rnndrop.config.RecurrentDropout`, the ``published`` fields (those the study's
    published hashes were computed with) and every other field that is not at its default.
    The later fields are read from the config's class, so a new site or option of
    ``RecurrentDropout`` changes no published hash without any list being edited.
    """
    data = dropout.to_dict()
    if not isinstance(dropout, RecurrentDropout):
        return data
    defaults = {f.name: f.default for f in dataclasses.fields(dropout)}
    return {k: v for k, v in data.items() if k in published or v != defaults[k]}


def spec_hash(spec: Mapping[str, Any]) -> str:
    """The 12 hex digits every study names a run's configuration by (frozen formula)."""
    blob = json.dumps(spec, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def run_label(scheme: str, rate: float | None) -> str:
    """A scheme with its rate, e.g. ``variational_p0.25`` (the scheme alone without a rate)."""
    return scheme if rate is None else f"{scheme}_p{rate:g}"


@dataclass(frozen=True)
class Run:
    """One run of a study of schemes x rates x seeds (context, inference): a scheme at a rate
    (``None``: a scheme without the swept rate), from one seed. Formerly ``ContextCell`` and
    ``InferenceCell``."""

    scheme: str
    rate: float | None
    seed: int

    @property
    def label(self) -> str:
        """Scheme with its rate, e.g. ``variational_p0.25``."""
        return run_label(self.scheme, self.rate)

    def __str__(self) -> str:
        return f"{self.label} seed={self.seed}"


@dataclass
class Study:
    """The settings every study has, and what it does with them.

    A subclass adds its own fields, redeclares the defaults it wants, and defines ``root`` (its
    folder), ``cell_spec`` (everything that decides a run's result) and, when its grid is more
    than schemes x rates x seeds, ``cells`` and ``cell_dir``. Its ``__post_init__`` calls
    :meth:`_check_study` before its own checks.
    """

    name: str = "study"  # the study's folder under out_dir
    schemes: list[str] = field(default_factory=lambda: ["none", "variational"])
    rates: list[float] = field(default_factory=lambda: [0.25])  # "p" of the schemes
    seeds: list[int] = field(default_factory=lambda: [0])  # data, initialisation, MC draws
    custom_schemes: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> scheme
    model: dict[str, Any] = field(default_factory=lambda: {"hidden_size": 64})
    steps: int = 2000  # optimiser steps per run
    batch_size: int = 32
    optimizer: str = "adam"
    lr: float = 3e-3
    gradient_clip_val: float = 1.0
    out_dir: str = "runs"

    #: what the settings are called in errors ("context-study" ...)
    _SETTINGS: ClassVar[str] = "study"
    #: the dropout fields in every run's spec (:func:`dropout_spec`)
    _DROPOUT_FIELDS: ClassVar[tuple[str, ...]] = V1_DROPOUT_FIELDS

    # -- validation ----------------------------------------------------------------------

    def _check_study(self, positive: tuple[str, ...] = ("steps", "batch_size")) -> None:
        """The shared checks: known schemes, ``positive`` settings >= 1, a seed, every scheme
        valid at every rate, and model settings that leave encoder and dropout to schemes."""
        from .config import check_model_settings, check_schemes

        check_schemes(self.schemes, self.custom_schemes)
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be >= 1 (an integer), got {value!r}")
        if not self.seeds:
            raise ValueError("seeds: give at least one seed")
        self._check_all_schemes()
        check_model_settings(self.model, "model")

    def _check_all_schemes(self) -> None:
        """Resolve every scheme at every rate now: a bad one fails before any run starts."""
        from .config import resolve_scheme

        for scheme in self.all_schemes():
            for p in self.rates_for(scheme):
                try:
                    resolve_scheme(self.scheme_spec(scheme), p)
                except (ValueError, TypeError) as err:
                    raise ValueError(f"scheme {scheme!r}: {err}") from err

    # -- the grid ------------------------------------------------------------------------

    def all_schemes(self) -> list[str]:
        """Every scheme the study runs."""
        return list(self.schemes)

    def scheme_spec(self, scheme: str) -> dict[str, Any]:
        """The scheme's definition: ``custom_schemes``' entry or the built-in one."""
        from .config import BUILTIN_SCHEMES

        return self.custom_schemes.get(scheme) or BUILTIN_SCHEMES[scheme]

    def model_for(self, scheme: str) -> dict[str, Any]:
        """The study's model settings with the scheme's own overrides."""
        return {**self.model, **self.scheme_spec(scheme).get("model", {})}

    def rates_for(self, scheme: str) -> list[float | None]:
        """The swept rates, or ``[None]`` for a scheme that does not use the rate."""
        from .config import uses_rate

        return list(self.rates) if uses_rate(self.scheme_spec(scheme)) else [None]

    def resolve(self, scheme: str, rate: float | None):
        """``(encoder, dropout config)`` of a scheme at a rate."""
        from .config import resolve_scheme

        return resolve_scheme(self.scheme_spec(scheme), rate)

    def cells(self) -> list[Any]:
        """Every run, in a fixed order (scheme, rate, seed)."""
        return [Run(s, p, seed) for s in self.all_schemes() for p in self.rates_for(s)
                for seed in self.seeds]  # fmt: skip

    @property
    def root(self) -> Path:
        """The folder of the study's runs and report."""
        raise NotImplementedError

    def cell_dir(self, run: Any) -> Path:
        """``<root>/<scheme label>/seed=<s>``."""
        return self.root / run.label / f"seed={run.seed}"

    # -- hashes and results --------------------------------------------------------------

    def cell_spec(self, run: Any) -> dict[str, Any]:
        """Everything that determines a run's result (hashed to recognise finished runs)."""
        raise NotImplementedError

    def dropout_spec(self, dropout: RecurrentDropout | TransformerDropout) -> dict[str, Any]:
        """A dropout config as this study's run specs hold it (:func:`dropout_spec`)."""
        return dropout_spec(dropout, self._DROPOUT_FIELDS)

    def cell_hash(self, run: Any) -> str:
        """The run's configuration hash, written into its ``result.json``."""
        return spec_hash(self.cell_spec(run))

    def load_result(self, run: Any, *, any_hash: bool = False) -> dict[str, Any] | None:
        """The run's saved result if it was computed with exactly this configuration (same
        hash); with ``any_hash``, whatever result is saved. None if absent or unreadable."""
        try:
            result = json.loads((self.cell_dir(run) / RESULT).read_text())
        except (OSError, json.JSONDecodeError):
            return None
        return result if any_hash or result.get("config_hash") == self.cell_hash(run) else None

    def to_dict(self) -> dict[str, Any]:
        """The settings as plain data."""
        return dataclasses.asdict(self)

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, **overrides: Any):
        """A study from a YAML file (keys as the class's fields) plus the ``overrides`` that
        are not None."""
        return cls(**read_settings(path, overrides, cls, cls._SETTINGS))
