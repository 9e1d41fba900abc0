"""What a long-range study is: the grid (scheme x rate x distance x seed) and the budget."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..config import RecurrentDropout, TransformerDropout

__all__ = ["BUILTIN_SCHEMES", "Cell", "StudyConfig", "load_study", "resolve_scheme"]

FORMAT = 1  # bump when a cell's results would no longer be comparable

# A scheme: the encoder, its dropout config, with "p" standing for the swept rate ("p/10",
# "p*2" also work), and optionally model settings that override the study's `model` for this
# scheme. Schemes without "p" run once, whatever the rates.
_TRANSFORMER = {"num_layers": 2}  # a one-layer LSTM's match: attention needs depth to copy
BUILTIN_SCHEMES: dict[str, dict[str, Any]] = {
    "none": {"encoder": "lstm", "dropout": {}},
    "naive": {"encoder": "lstm", "dropout": {"input": "p", "between_layers": "p", "output": "p",
                                             "time": "per_step"}},
    "naive_recurrent": {"encoder": "lstm", "dropout": {
        "input": "p", "between_layers": "p", "output": "p", "recurrent": "p", "time": "per_step"}},
    "variational": {"encoder": "lstm", "dropout": {
        "input": "p", "between_layers": "p", "output": "p", "recurrent": "p"}},
    "variational_untied": {"encoder": "lstm", "dropout": {
        "input": "p", "between_layers": "p", "output": "p", "recurrent": "p", "tied": False}},
    "zoneout": {"encoder": "lstm", "dropout": {"zoneout_cell": "p", "zoneout_hidden": "p"}},
    "weight_drop": {"encoder": "lstm", "dropout": {"weight_hh": "p"}},
    "semeniuta": {"encoder": "lstm", "dropout": {"candidate": "p", "time": "per_step"}},
    "awd": {"encoder": "lstm", "dropout": {"input": "p", "between_layers": "p", "output": "p",
                                           "weight_hh": "p"}},
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


def _uses_rate(spec: dict[str, Any]) -> bool:
    return any(_is_placeholder(v) for v in spec.get("dropout", {}).values())


def resolve_scheme(spec: dict[str, Any], p: float | None) -> tuple[str, dict[str, Any]]:
    """``(encoder, dropout dict)`` for a scheme at rate ``p``, validated."""
    unknown = sorted(set(spec) - {"encoder", "dropout", "model"})
    if unknown:
        raise ValueError(f"scheme keys {unknown} unknown; a scheme has encoder, dropout, model")
    encoder = spec.get("encoder", "lstm")
    if encoder not in ("lstm", "transformer"):
        raise ValueError(f"scheme encoder must be 'lstm' or 'transformer', got {encoder!r}")
    dropout = {k: _substitute(v, p) for k, v in spec.get("dropout", {}).items()}
    cls = RecurrentDropout if encoder == "lstm" else TransformerDropout
    return encoder, cls.from_dict(dropout).to_dict()  # raises naming a bad field or rate


@dataclass(frozen=True)
class Cell:
    """One run of the grid."""

    scheme: str
    rate: float | None
    distance: int
    seed: int

    @property
    def label(self) -> str:
        """Scheme with its rate, e.g. ``variational_p0.25``."""
        return self.scheme if self.rate is None else f"{self.scheme}_p{self.rate:g}"

    def __str__(self) -> str:
        return f"{self.label} d={self.distance} seed={self.seed}"


@dataclass
class StudyConfig:
    """A long-range study: schemes x rates x distances x seeds on one synthetic task.

    Each cell trains a fresh :class:`~rnndrop.models.SequenceModel` for the same budget
    (``steps`` optimiser steps of ``batch_size`` new samples) and is then evaluated on
    ``eval_size`` held-out samples, deterministically and with ``mc_samples`` MC passes.
    """

    name: str = "long_range"  # the study's folder under out_dir
    task: str = "copy"  # copy | delayed_recall | adding | associative_recall
    task_args: dict[str, Any] = field(default_factory=dict)  # e.g. {n_copy: 1}
    distances: list[int] = field(default_factory=lambda: [10, 50, 100])
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    rates: list[float] = field(default_factory=lambda: [0.25])
    schemes: list[str] = field(default_factory=lambda: ["none", "variational"])
    custom_schemes: dict[str, dict[str, Any]] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=lambda: {"hidden_size": 64})
    steps: int = 2000  # optimiser steps per cell
    batch_size: int = 32
    optimizer: str = "adam"
    lr: float = 3e-3
    gradient_clip_val: float = 1.0
    val_every: int = 500  # validation (TensorBoard curves) every n steps
    eval_size: int = 1000  # held-out samples for the final evaluation
    mc_samples: int = 8  # MC dropout passes in the final evaluation (0: off)
    grad_distances: list[int] | None = None  # k for gradient norm through time
    report_grad_distance: int | None = None  # the report's gradient curves (default: middle d)
    solved_threshold: float = 0.9  # normalised accuracy that counts as solved
    out_dir: str = "runs"

    def __post_init__(self) -> None:
        known = {**BUILTIN_SCHEMES, **self.custom_schemes}
        unknown = [s for s in self.schemes if s not in known]
        if unknown:
            raise ValueError(
                f"unknown scheme(s) {unknown}; built in: {sorted(BUILTIN_SCHEMES)}; or define "
                "them under custom_schemes"
            )
        for name, value in (("steps", self.steps), ("batch_size", self.batch_size),
                            ("eval_size", self.eval_size)):  # fmt: skip
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if not self.distances or any(d < 1 for d in self.distances):
            raise ValueError(f"distances must be positive integers, got {self.distances}")
        if not self.seeds:
            raise ValueError("seeds: give at least one seed")
        for scheme in self.schemes:  # validate every scheme at every rate now, not mid-sweep
            for p in self.rates_for(scheme):
                resolve_scheme(self.scheme_spec(scheme), p)

    def scheme_spec(self, scheme: str) -> dict[str, Any]:
        return self.custom_schemes.get(scheme) or BUILTIN_SCHEMES[scheme]

    def model_for(self, scheme: str) -> dict[str, Any]:
        """The study's model settings with the scheme's own overrides."""
        return {**self.model, **self.scheme_spec(scheme).get("model", {})}

    def rates_for(self, scheme: str) -> list[float | None]:
        return list(self.rates) if _uses_rate(self.scheme_spec(scheme)) else [None]

    def cells(self) -> list[Cell]:
        """Every cell, in a fixed order (scheme, rate, distance, seed)."""
        return [
            Cell(s, p, d, seed)
            for s in self.schemes
            for p in self.rates_for(s)
            for d in self.distances
            for seed in self.seeds
        ]

    @property
    def root(self) -> Path:
        return Path(self.out_dir) / self.name / self.task

    def cell_dir(self, cell: Cell) -> Path:
        """``runs/<study>/<task>/<scheme>/d=<d>/seed=<s>`` (the rate is part of the scheme)."""
        return self.root / cell.label / f"d={cell.distance}" / f"seed={cell.seed}"

    def cell_spec(self, cell: Cell) -> dict[str, Any]:
        """Everything that determines a cell's result (hashed to recognise finished cells)."""
        encoder, dropout = resolve_scheme(self.scheme_spec(cell.scheme), cell.rate)
        train = {k: getattr(self, k) for k in ("steps", "batch_size", "optimizer", "lr",
                                                "gradient_clip_val", "val_every")}  # fmt: skip
        evaluation = {k: getattr(self, k) for k in ("eval_size", "mc_samples", "grad_distances")}
        return {
            "format": FORMAT, "task": self.task, "task_args": self.task_args,
            "distance": cell.distance, "seed": cell.seed, "scheme": cell.scheme,
            "rate": cell.rate, "encoder": encoder, "dropout": dropout,
            "model": self.model_for(cell.scheme),
            "train": train, "eval": evaluation,
        }  # fmt: skip

    def cell_hash(self, cell: Cell) -> str:
        blob = json.dumps(self.cell_spec(cell), sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_study(path: str | Path | None = None, **overrides: Any) -> StudyConfig:
    """A study from a YAML file (keys as :class:`StudyConfig`'s fields) plus overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"study config {path} does not exist")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of study settings, got {type(data)}")
    data.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in dataclasses.fields(StudyConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown study setting(s) {unknown}; valid: {sorted(known)}")
    return StudyConfig(**data)
