"""Process settings that decide how fast training runs on a CPU, and the record of the machine.

Two settings, both per process, both with effects only on speed (and on values no measurement
reads), both applied by ``rnndrop fit``, the studies and the Lightning tasks, and left to the
user where the layers are used directly:

- **Subnormal floats** (:func:`set_flush_subnormals`). Gradients that vanish through hundreds
  of steps of backprop through time pass through the subnormal range (``|v| < 1.2e-38`` in
  float32), and Intel cores pay a microcode assist for each subnormal operand: measured on an
  Intel Xeon (AVX-512, AMX), LSTM H 128, T 500, B 32, 2 threads, a per-batch recurrent mask on
  the fused path took 3.3x ``nn.LSTM`` and 0.95x with flushing (docs/engine.md). AMD cores pay
  far less, which is why the same code measured about 1.0x there. Flush-to-zero and
  denormals-are-zero replace those values by 0: the gradient-through-time figures then floor
  at about 1e-38 instead of 1e-45, and a run reproduces bit for bit under the same setting.
- **The allocator** (:func:`tune_allocator`): glibc returns large freed blocks to the kernel
  and training then page-faults them back every step (about 15-20% of a PTB-small step).

:func:`machine` names what a benchmark or a study ran on: CPU, vector ISA, threads, torch and
the subnormal setting. Imports only torch and the standard library.
"""

from __future__ import annotations

import contextlib
import os
import platform
import sys
import warnings
from collections.abc import Iterator
from typing import Any

import torch

__all__ = [
    "flush_subnormals",
    "flush_subnormals_mode",
    "flushing_subnormals",
    "machine",
    "set_flush_subnormals",
    "training_defaults",
    "tune_allocator",
]

_OFF = {"0", "false", "off", "no"}
# None: the default (only the compiled loop flushes, inside its own calls); True / False: the
# user's or the training stack's explicit choice for every thread of the process.
_mode: bool | None = None
_threads = 0  # intra-op threads when the mode was last applied (a new pool starts unflushed)
_warned = False


def _ext():
    from .kernels.cpp import build

    return build.load()


def set_flush_subnormals(mode: bool | None = True) -> bool | None:
    """Flush subnormal floats to zero on this thread and every intra-op thread of torch.

    ``True`` flushes everywhere rnndrop's layers run: the fused path (oneDNN's LSTM/GRU), the
    python loop and the compiled loop, and everything else this process computes on those
    threads (as ``torch.set_flush_denormal``, which sets only the calling thread: torch's
    OpenMP workers do not inherit it). ``False`` keeps subnormals everywhere, the compiled loop
    included (exact IEEE arithmetic). ``None`` is the library default: nothing flushes except
    the compiled C++ loop inside its own forward and backward calls, which restore the
    caller's setting when they return.

    Only values below ``torch.finfo(dtype).tiny`` (1.2e-38 in float32) change. On x86 this is
    the MXCSR FTZ and DAZ bits, on aarch64 FPCR.FZ; elsewhere nothing changes. Set it from the
    thread that runs the model (the thread that calls ``backward`` on a CPU graph).

    Args:
        mode: ``True``, ``False`` or ``None`` as above.

    Returns:
        The previous mode, for restoring it (or use :func:`flush_subnormals`).
    """
    global _mode, _threads, _warned
    if mode not in (True, False, None):
        raise ValueError(f"set_flush_subnormals: mode must be True, False or None, got {mode!r}")
    previous, _mode = _mode, mode
    ext = _ext() if mode else _loaded_ext()
    if ext is not None:
        ext.set_loop_flush(mode is not False)
        ext.set_flush(bool(mode))
    else:
        torch.set_flush_denormal(bool(mode))
        if mode and torch.get_num_threads() > 1 and not _warned:
            _warned = True
            from .kernels.cpp import build

            warnings.warn(
                "rnndrop.set_flush_subnormals: only the calling thread flushes subnormals, "
                f"since the compiled helper is unavailable ({build.why_unavailable()}); "
                "torch's other intra-op threads keep them (torch.set_num_threads(1) makes "
                "the setting complete).",
                RuntimeWarning,
                stacklevel=2,
            )
    _threads = torch.get_num_threads()
    return previous


def _loaded_ext():
    from .kernels.cpp import build

    return build.loaded()


def flush_subnormals_mode() -> bool | None:
    """The mode last given to :func:`set_flush_subnormals` (``None``: the default)."""
    return _mode


def flushing_subnormals() -> bool:
    """True if the calling thread flushes subnormals now (outside the compiled loop's calls)."""
    ext = _loaded_ext()
    return bool(ext.flushing()) if ext is not None else bool(_mode)


def reapply_if_needed() -> None:
    """Flush on a pool that grew since the mode was set (``torch.set_num_threads``): its new
    threads start unflushed. One integer comparison when nothing changed; the layers call it."""
    if _mode and torch.get_num_threads() != _threads:
        set_flush_subnormals(True)


@contextlib.contextmanager
def flush_subnormals(mode: bool | None = True) -> Iterator[None]:
    """Context manager form of :func:`set_flush_subnormals`; restores the previous mode."""
    previous = set_flush_subnormals(mode)
    try:
        yield
    finally:
        set_flush_subnormals(previous)


def tune_allocator() -> bool:
    """Keep freed tensor memory in the process (glibc on Linux); True if it was set.

    PyTorch's CPU tensors come from ``malloc``. glibc hands blocks of a few MB and more
    (a 20x35x10000 logits tensor is 28 MB) back to the kernel when they are freed, and
    every training step then page-faults them in again: measured on the PTB-small benchmark
    (scripts/bench_training.py), 34 ms/step of kernel time and 14,500 minor faults a step,
    about 15% of the step. A fixed mmap threshold of 32 MB and a trim threshold of 2 GB keep
    that memory mapped (the process keeps its peak heap, as a training run does anyway).
    Nothing is changed when the user set ``MALLOC_*`` variables or preloads an allocator
    (jemalloc, tcmalloc), or off glibc.
    """
    import ctypes

    if sys.platform != "linux" or "LD_PRELOAD" in os.environ or \
            any(k.startswith("MALLOC_") for k in os.environ):  # fmt: skip
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
        return bool(libc.mallopt(m_mmap_threshold, 32 << 20)) and bool(
            libc.mallopt(m_trim_threshold, 2**31 - 1)
        )
    except (OSError, AttributeError):  # not glibc (musl, ...)
        return False


_applied = False


def training_defaults() -> None:
    """What ``rnndrop fit``, the studies and the Lightning tasks set, once per process: the
    allocator (:func:`tune_allocator`) and flushing subnormals, unless the user chose a flush
    mode already or set ``RNNDROP_FLUSH_SUBNORMALS=0``."""
    global _applied
    if _applied:
        reapply_if_needed()
        return
    _applied = True
    tune_allocator()
    if _mode is None and os.environ.get("RNNDROP_FLUSH_SUBNORMALS", "1").lower() not in _OFF:
        set_flush_subnormals(True)


def _cpu_name() -> str:
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "Model name")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return name


def _cpu_features() -> list[str]:
    """The vector extensions that decide kernel speed here, as the OS reports them."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((ln.split(":", 1)[1].split() for ln in f if ln.startswith("flags")), [])
    except OSError:
        flags = []
    wanted = {"avx2": "AVX2", "avx512f": "AVX-512", "amx_tile": "AMX", "asimd": "NEON",
              "sve": "SVE"}  # fmt: skip
    return [label for flag, label in wanted.items() if flag in flags]


def machine() -> dict[str, Any]:
    """What decides a run's speed and its floating-point results beside its seed.

    ``isa`` (torch's kernel capability), ``torch``, ``threads`` and ``flush_subnormals``
    decide the bits; ``cpu`` and ``features`` (AVX2, AVX-512, AMX as the OS reports them) are
    for the reader: the subnormal cost above is an Intel one.
    """
    return {"isa": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "cpu": _cpu_name(),
            "features": _cpu_features(), "flush_subnormals": flushing_subnormals()}  # fmt: skip


def describe_machine() -> str:
    """One line for a benchmark's header."""
    m = machine()
    feats = ", ".join(m["features"]) or "no AVX2"
    flush = "flushed" if m["flush_subnormals"] else "kept"
    return (f"{m['cpu']} ({feats}; torch kernels {m['isa']}), {m['threads']} threads, "
            f"torch {m['torch']}, subnormals {flush}")  # fmt: skip
