"""Checkpoints that survive a kill, and one clear line for a checkpoint that cannot be used.

- :class:`AtomicCheckpointIO`: every checkpoint a task's trainer writes (``last.ckpt``, the
  best, ``last_good.ckpt``, a preemption save) goes to a temporary file beside the target,
  is fsynced and renamed into place (:func:`rnndrop.atomic.atomic_write`): a SIGKILL at any
  moment leaves the previous checkpoint or the new one, and a save that fails (a full disk)
  leaves the previous one and stops the run with :class:`CheckpointSaveError`.
- :func:`read_checkpoint`: a checkpoint to resume from, or :class:`CheckpointError` naming
  the file, the problem and the sound checkpoints beside it.
- :func:`conflicts`: the explicit settings of a run that a checkpoint's own settings
  contradict (``rnndrop fit --ckpt_path`` refuses them instead of dropping them silently).
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import TorchCheckpointIO

from ..atomic import atomic_write, remove_stale

__all__ = [
    "RESUMABLE",
    "AtomicCheckpointIO",
    "CheckpointError",
    "CheckpointSaveError",
    "conflicts",
    "read_checkpoint",
    "sound_checkpoints",
    "use_atomic_checkpoints",
]


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written (a full disk, a lost mount); the previous one at the
    same path, if any, is intact."""

    def __init__(self, path: Path, err: OSError) -> None:
        self.path, self.err = path, err
        reason = err.strerror or str(err)
        kept = (f"the previous {path.name} is intact" if path.is_file()
                else "no earlier checkpoint of that name")  # fmt: skip
        resume = f"; resume with --ckpt_path {path}" if path.is_file() else ""
        super().__init__(
            f"rnndrop: cannot save checkpoint {path}: {reason}; training stopped, {kept}. "
            f"Free space (or choose another --trainer.default_root_dir){resume}"
        )


class CheckpointError(ValueError):
    """A checkpoint to resume from is missing, torn, not a checkpoint, of another task or
    model, or from a newer rnndrop (the message is one line)."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` whose local writes are atomic and durable.

    Lightning's own writer serialises to memory and writes the target in place (or through a
    temporary file in ``$TMPDIR`` that is *copied* over when that is another filesystem):
    a kill during the write leaves a torn checkpoint, and nothing is fsynced. Remote paths
    (``s3://``) keep Lightning's writer.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any,
                        storage_options: Any | None = None) -> None:  # fmt: skip
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_write(path) as f:
                torch.save(checkpoint, f)
        except OSError as err:
            raise CheckpointSaveError(path, err) from err
        remove_stale(path)  # temporary files of a writer killed before this one


def use_atomic_checkpoints(trainer: Any) -> None:
    """Give ``trainer`` the atomic writer, unless the user chose another CheckpointIO."""
    strategy = trainer.strategy
    current = getattr(strategy, "_checkpoint_io", None)
    if current is None or type(current) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()


# ---- reading a checkpoint to resume from -------------------------------------------------------


def _load(path: Path) -> dict[str, Any]:
    # memory-mapped: a check of a multi-GB checkpoint reads its index, not its tensors (a
    # truncated file has no index: it fails here all the same)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # an old-format file cannot be mapped: read it whole (or fail)
        return torch.load(path, map_location="cpu", weights_only=True)


def _is_checkpoint(ckpt: Any) -> bool:
    return isinstance(ckpt, dict) and "state_dict" in ckpt and "pytorch-lightning_version" in ckpt


def sound_checkpoints(path: Path) -> list[Path]:
    """The checkpoints beside ``path`` that load: ``last_good.ckpt``, the best (the newest
    three, newest first), ``last.ckpt``."""
    directory = path.parent
    if not directory.is_dir():
        return []
    best = sorted(directory.glob("best*.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True)
    candidates = [directory / "last_good.ckpt", *best[:3], directory / "last.ckpt"]
    out = []
    for p in candidates:
        if p.is_file() and p.resolve() != path.resolve():
            try:
                if _is_checkpoint(_load(p)):
                    out.append(p)
            except Exception:  # torn or foreign: not one to point at
                continue
    return out


def _newer(version: str, than: str) -> bool:
    from packaging.version import InvalidVersion, Version

    try:
        return Version(version) > Version(than)
    except InvalidVersion:
        return False


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint to resume from (on the CPU, weights only); raise
    :class:`CheckpointError` with one line: the file, the problem, and where a sound
    ``last_good.ckpt`` or best checkpoint lies beside it."""
    from .. import __version__

    path = Path(path)
    ckpt = None
    if not path.exists():
        problem = "no such file"
    elif not path.is_file():
        problem = "not a file"
    else:
        try:
            ckpt = _load(path)
        except Exception as err:
            size = path.stat().st_size
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            problem = (f"not a readable checkpoint ({size} bytes: truncated, corrupt or not a "
                       f"torch file; {first})")  # fmt: skip
        else:
            version = (ckpt.get("rnndrop") or {}).get("version") if isinstance(ckpt, dict) else None
            if not _is_checkpoint(ckpt):
                problem = "not a Lightning checkpoint (no state_dict or Lightning version in it)"
            elif isinstance(version, str) and _newer(version, __version__):
                problem = (f"written by rnndrop {version}, newer than this rnndrop {__version__}; "
                           "upgrade rnndrop to resume it")  # fmt: skip
            else:
                return ckpt
    raise CheckpointError(f"{path}: {problem}" + _beside(path))


def _beside(path: Path) -> str:
    sound = sound_checkpoints(path)
    if not sound:
        return ""
    names = ", ".join(p.name for p in sound)
    return f"; sound checkpoint(s) beside it: {names} (e.g. --ckpt_path {sound[0]})"


# ---- explicit settings against the checkpoint's ----------------------------------------------

#: settings a resumed run may change (trainer, checkpoint and logging settings, and
#: ``ckpt_path`` itself, are never compared: they are not the checkpoint's); see the README
RESUMABLE = {
    "model": ("lr_decay", "decay_start", "nonmono", "mc_samples", "reliability_diagrams"),
    "data": ("data_dir", "download", "num_workers", "eval_batch_size"),
}


def _plain(value: Any) -> Any:
    """A jsonargparse Namespace, dataclass or nested container as plain dicts and lists."""
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    elif hasattr(value, "__dataclass_fields__"):
        value = asdict(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if not str(k).startswith("_")}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _get(tree: Any, keys: list[str]) -> tuple[bool, Any]:
    for k in keys:
        if not isinstance(tree, dict) or k not in tree:
            return False, None
        tree = tree[k]
    return True, tree


def _normalise(keys: list[str], value: Any) -> Any:
    """Dropout settings in one form (a preset name, a dict, a float all become the config)."""
    if keys and keys[-1] in ("dropout", "transformer_dropout"):
        from ..config import TransformerDropout, as_dropout

        if isinstance(value, dict) and "init_args" in value:  # the parser's class form
            value = value["init_args"] or {}
        try:
            if keys[-1] == "dropout":
                return asdict(as_dropout(value))
            if value is None:
                return asdict(TransformerDropout())
            return asdict(value if isinstance(value, TransformerDropout)
                          else TransformerDropout(**value))  # fmt: skip
        except (TypeError, ValueError):
            return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _show(value: Any) -> str:
    return "null" if value is None else str(value)


def conflicts(ckpt: dict[str, Any], config: Any,
              explicit: list[tuple[str, str]]) -> list[str]:  # fmt: skip
    """What in the run contradicts the checkpoint, one phrase each.

    ``config`` is the run's parsed subcommand config (``model``, ``data``); ``explicit`` the
    ``(where, dotted key)`` of every setting the user gave. The task and model classes must be
    the checkpoint's; a setting given explicitly must equal the checkpoint's value unless it
    is :data:`RESUMABLE`; the data module's settings (which the checkpoint does not restore)
    must equal the checkpoint's whether given or default.
    """
    cfg = _plain(config)
    hp = _plain(ckpt.get("hyper_parameters") or {})
    hp_class = (ckpt.get("hyper_parameters") or {}).get("_class_path")
    dm_hp = ckpt.get("datamodule_hyper_parameters")
    where_of = {key: where for where, key in explicit}
    out: list[str] = []

    def origin(key: str) -> str:
        where = where_of.get(key)
        if where is None:
            return " (default)"
        return f" ({where})" if where.startswith("--") else f" ({where}: {key})"

    def differ(run_class: Any, ckpt_class: Any, key: str, what: str) -> None:
        if ckpt_class and run_class and run_class != ckpt_class:
            out.append(f"{what}: the checkpoint's is {ckpt_class}, this run's {run_class}"
                       + origin(key))  # fmt: skip

    model = cfg.get("model") or {}
    differ(model.get("class_path"), hp_class, "model.class_path", "task class")
    run_net = (model.get("init_args") or {}).get("model") or {}
    differ(run_net.get("class_path") if isinstance(run_net, dict) else None,
           (hp.get("model") or {}).get("class_path") if isinstance(hp.get("model"), dict)
           else None, "model.init_args.model.class_path", "model class")  # fmt: skip
    # the model and task: explicit settings only (the rest comes from the checkpoint)
    seen = set()
    for _, key in reversed(explicit):  # the last setting of a key is the one that applies
        parts = key.split(".")
        if parts[:2] != ["model", "init_args"] or len(parts) < 3:
            continue
        rel = parts[2:]
        if rel[0] in RESUMABLE["model"]:
            continue
        # compare a dropout setting as a whole (a preset name against the saved fields)
        for i, p in enumerate(rel):
            if p in ("dropout", "transformer_dropout"):
                rel = rel[: i + 1]
                break
        if rel[-1] == "class_path" or tuple(rel) in seen:
            continue
        seen.add(tuple(rel))
        found_run, run_value = _get(model.get("init_args") or {}, rel)
        found_ckpt, ckpt_value = _get(hp, rel)
        if not (found_run and found_ckpt):
            continue
        if isinstance(run_value, dict) and rel[-1] not in ("dropout", "transformer_dropout"):
            continue  # a group (init_args): its leaves are compared one by one
        a, b = _normalise(rel, run_value), _normalise(rel, ckpt_value)
        if a != b:
            if isinstance(a, dict) and isinstance(b, dict):
                diff = [k for k in a if a.get(k) != b.get(k)]
                a = {k: a[k] for k in diff}
                b = {k: b.get(k) for k in diff}
            name = ".".join(p for p in rel if p != "init_args")
            out.append(f"{name} {_show(a)}{origin(key)} against the checkpoint's {_show(b)}")
    # the data: every setting (the checkpoint does not restore them, and other data under the
    # same weights is another experiment)
    if isinstance(dm_hp, dict):
        data = cfg.get("data") or {}
        differ(data.get("class_path"), dm_hp.get("_class_path"), "data.class_path",
               "data module")  # fmt: skip
        init = data.get("init_args") or {}
        for k, v in _plain(dm_hp).items():
            if k in RESUMABLE["data"] or k not in init:
                continue
            if _normalise([k], init[k]) != _normalise([k], v):
                out.append(f"data {k} {_show(init[k])}{origin(f'data.init_args.{k}')} against "
                           f"the checkpoint's {_show(v)}")  # fmt: skip
    return out
