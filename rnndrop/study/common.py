"""What the long-range and context studies share: run directories, results, report pieces."""

from __future__ import annotations

import json
import logging
import math
import os
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ..atomic import atomic_write
from ..runtime import machine

__all__ = [
    "format_ci",
    "fresh_run_dir",
    "group_by",
    "machine",
    "read_settings",
    "same_machine",
    "tensorboard_summary",
    "write_json",
]


def read_settings(
    path: str | os.PathLike | None, overrides: dict[str, Any], config: type, what: str
) -> dict[str, Any]:
    """A study's settings: the YAML mapping at ``path`` (if any), updated by the ``overrides``
    that are not None; a key that is not a field of the dataclass ``config`` is an error
    naming the valid ones (``what``: "study", "context-study", ...)."""
    import dataclasses

    import yaml

    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"study config {path} does not exist")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of study settings, got {type(data)}")
    data.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in dataclasses.fields(config)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown {what} setting(s) {unknown}; valid: {sorted(known)}")
    return data


def same_machine(a: dict[str, Any], b: dict[str, Any]) -> bool | None:
    """Whether two results ran where the same seed gives the same bits (ISA, torch, threads,
    subnormal flushing); None when either predates this record."""
    ma, mb = a.get("machine"), b.get("machine")
    if not ma or not mb:
        return None
    # results from before the subnormal switch ran without flushing
    return all(ma.get(k) == mb.get(k) for k in ("isa", "torch", "threads")) and \
        ma.get("flush_subnormals", False) == mb.get("flush_subnormals", False)  # fmt: skip


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` atomically and durably (temporary file, fsync, rename): a killed run or
    a full disk never leaves a half-written file."""
    text = json.dumps(data, indent=2, default=float)  # a value JSON cannot take fails here
    with atomic_write(path, "w", encoding="utf-8") as f:
        f.write(text)


def fresh_run_dir(out: Path, progress: bool, resuming: bool = False) -> None:
    """Prepare a cell's run directory; quiet Lightning unless ``progress``.

    A cell killed before writing result.json left a partial run here: its TensorBoard events
    and its checkpoints go, so the curves and an export read only the new run and no later
    resume mistakes the old run's checkpoint for the new one's (``resuming``: a run that goes
    on from the partial one keeps them).
    """
    if not progress:  # a summary line per cell instead of Lightning's banners
        for name in ("lightning.pytorch", "lightning.fabric"):
            logging.getLogger(name).setLevel(logging.WARNING)
    out.mkdir(parents=True, exist_ok=True)
    if resuming:
        return
    stale = [*out.glob("events.out.tfevents.*"), out / "hparams.yaml",
             *out.glob("checkpoints/last_good*.ckpt")]  # fmt: skip
    for path in stale:
        path.unlink(missing_ok=True)


def group_by(rows: Iterable[Any], key: Callable[[Any], Any]) -> dict[Any, list[Any]]:
    """``rows`` grouped by ``key(row)``, groups in first-seen order."""
    out: dict[Any, list[Any]] = defaultdict(list)
    for r in rows:
        out[key(r)].append(r)
    return out


def format_ci(mean: float, half: float, digits: int = 2) -> str:
    """``mean ± half`` for a table (``–`` for no value, the mean alone for no interval)."""
    if math.isnan(mean):
        return "–"
    return f"{mean:.{digits}f}" if math.isnan(half) else f"{mean:.{digits}f} ± {half:.{digits}f}"


def tensorboard_summary(
    root: Path, paths: dict[str, Path], markdown: str, images: Iterable[str]
) -> None:
    """A report's figures and table in a TensorBoard run of their own: ``<root>/summary``.

    ``images`` are keys of ``paths`` (PNG files, e.g. ``"score_png"``), logged as
    ``report/<key without _png>``; the Markdown goes to ``report/summary``.
    """
    import numpy as np
    from PIL import Image
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(root / "summary"))
    for key in images:
        if key in paths:
            img = np.asarray(Image.open(paths[key]).convert("RGB"))
            writer.add_image(f"report/{key.removesuffix('_png')}", img, dataformats="HWC")
    writer.add_text("report/summary", markdown)
    writer.close()
