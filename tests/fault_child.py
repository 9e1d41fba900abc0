"""`rnndrop ...` in a child process that tests kill: ``python tests/fault_child.py fit ...``.

Set by environment variables (all optional):

- ``FAULT_LOSSES=FILE``: append ``<global step> <training loss as float.hex>`` after every
  training step (flushed, so a SIGKILL loses nothing written before it).
- ``FAULT_HOLD=N``: after step N print ``HOLD N`` to stderr and wait there (up to 60 s, or
  until a SIGTERM arrives): the parent kills or signals a run that is mid-epoch, at a known
  step.
- ``FAULT_PAUSE=NAME:K``: the K-th time a file whose name contains NAME is opened for
  writing, stop after its first KiB (print ``PAUSED <path>`` and sleep 60 s): a save that
  is in progress when the parent kills the child. Both Python writes and ``os.sendfile``
  (what ``shutil`` copies with) are held.

Every step also prints ``STEP N`` to stderr.
"""

from __future__ import annotations

import builtins
import os
import sys
import time

PAUSE_AFTER = 1024


def _pause(path: str) -> None:
    print(f"PAUSED {path}", file=sys.stderr, flush=True)
    time.sleep(60)


class _HeldFile:
    """A binary file whose writes stop (sleep) once PAUSE_AFTER bytes are on disk."""

    def __init__(self, f, path: str) -> None:
        self._f, self._path, self._written = f, path, 0

    def write(self, data) -> int:
        data = bytes(data)
        room = max(PAUSE_AFTER - self._written, 0)
        n = self._f.write(data[:room]) if room else 0
        self._written += n
        if self._written >= PAUSE_AFTER:
            self._f.flush()
            os.fsync(self._f.fileno())
            _pause(self._path)
        return n + (self._f.write(data[n:]) if len(data) > n else 0)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._f.close()

    def __getattr__(self, name):
        return getattr(self._f, name)


def _install_pause(spec: str) -> None:
    name, _, k = spec.rpartition(":")
    count = {"n": 0}
    held_fds: set[int] = set()
    real_open, real_sendfile = builtins.open, os.sendfile

    def open_(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        if isinstance(file, str | os.PathLike) and name in os.fspath(file) and \
                any(c in mode for c in "wx"):  # fmt: skip
            count["n"] += 1
            if count["n"] == int(k):
                held_fds.add(f.fileno())
                return _HeldFile(f, os.fspath(file))
        return f

    def sendfile(out_fd, in_fd, offset, count_):
        if out_fd in held_fds:
            sent = real_sendfile(out_fd, in_fd, offset, min(count_, PAUSE_AFTER))
            os.fsync(out_fd)
            _pause(os.readlink(f"/proc/self/fd/{out_fd}"))
            return sent
        return real_sendfile(out_fd, in_fd, offset, count_)

    builtins.open = open_
    os.sendfile = sendfile


def _install_recorder(losses: str | None, hold: int | None) -> None:
    from lightning.pytorch.callbacks import Callback

    import rnndrop.lit.cli as cli

    class Record(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            step = trainer.global_step
            if losses:
                loss = outputs["loss"] if isinstance(outputs, dict) else outputs
                with open(losses, "a") as f:
                    f.write(f"{step} {float(loss).hex()}\n")
            print(f"STEP {step}", file=sys.stderr, flush=True)
            if step == hold:
                print(f"HOLD {step}", file=sys.stderr, flush=True)
                for _ in range(600):
                    if trainer.received_sigterm:
                        break
                    time.sleep(0.1)

    defaults = cli.trainer_defaults

    def trainer_defaults() -> dict:
        out = defaults()
        out["callbacks"] = [*out["callbacks"], Record()]
        return out

    cli.trainer_defaults = trainer_defaults


def main() -> int:
    if os.environ.get("FAULT_PAUSE"):
        _install_pause(os.environ["FAULT_PAUSE"])
    hold = os.environ.get("FAULT_HOLD")
    _install_recorder(os.environ.get("FAULT_LOSSES"), int(hold) if hold else None)
    from rnndrop.__main__ import main as rnndrop_main

    return rnndrop_main(sys.argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
