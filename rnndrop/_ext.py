"""Build-on-first-use loader for the optional C++ time loop (``rnndrop/csrc/lstm_loop.cpp``).

The kernel is never required: :func:`load` returns ``None`` when it is disabled
(``RNNDROP_EXTENSION=0``), when no compiler or ninja is available, or when the build
fails, and the loop path then runs in pure PyTorch. The build is announced on stderr,
takes ~30 s once, and is cached by torch's extension builder under
``$TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``), keyed by the source
hash, the compiler flags and the CPU capability.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import threading
import time
import warnings
from pathlib import Path
from types import ModuleType

import torch

__all__ = ["available", "disabled", "load", "loaded"]

_SOURCE = Path(__file__).resolve().parent / "csrc" / "lstm_loop.cpp"
_lock = threading.Lock()
_state: dict[str, object] = {}


def disabled() -> bool:
    """True if ``RNNDROP_EXTENSION`` is set to 0/false/off/no."""
    return os.environ.get("RNNDROP_EXTENSION", "1").strip().lower() in {"0", "false", "off", "no"}


def _flags() -> list[str]:
    # Explicit ISA flags (not -march=native) so the cache key names what the code needs.
    flags = ["-O3", "-fno-math-errno", "-fno-trapping-math"]
    capability = torch.backends.cpu.get_cpu_capability()
    if capability in {"AVX2", "AVX512"} and _is_x86():
        flags += ["-mavx2", "-mfma"]
    if capability == "AVX512" and _is_x86():
        flags += [
            "-mavx512f",
            "-mavx512dq",
            "-mavx512bw",
            "-mavx512vl",
            "-mprefer-vector-width=512",
        ]
    return flags


def _is_x86() -> bool:
    import platform

    return platform.machine().lower() in {"x86_64", "amd64"}


def _name(flags: list[str]) -> str:
    h = hashlib.sha256(_SOURCE.read_bytes())
    h.update(" ".join(flags).encode())
    h.update(torch.__version__.encode())
    return f"rnndrop_lstm_{h.hexdigest()[:12]}"


def load() -> ModuleType | None:
    """The compiled module, building it on first call; ``None`` if unavailable."""
    if disabled():
        return None
    with _lock:
        if "module" in _state:
            return _state["module"]  # type: ignore[return-value]
        _state["module"] = module = _build()
        return module


def loaded() -> ModuleType | None:
    """The compiled module if it is already loaded in this process; never builds."""
    return None if disabled() else _state.get("module")  # type: ignore[return-value]


def available() -> bool:
    """True if the compiled loop can be used (builds it if needed)."""
    return load() is not None


def _build() -> ModuleType | None:
    if not _SOURCE.exists():
        return None
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        warnings.warn(
            "rnndrop: no C++ compiler found; the LSTM loop path runs in pure PyTorch "
            "(slower). Install g++ to enable the compiled loop.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    try:
        from torch.utils import cpp_extension

        if not cpp_extension.is_ninja_available():
            raise RuntimeError("ninja is not installed (pip install ninja)")
        flags = _flags()
        name = _name(flags)
        build_dir = Path(cpp_extension._get_build_directory(name, verbose=False))
        cached = any(build_dir.glob(f"{name}*.so"))
        if not cached:
            print(
                f"rnndrop: compiling the LSTM loop kernel (first use only, ~30 s; cached in "
                f"{build_dir}; set RNNDROP_EXTENSION=0 to skip)",
                file=sys.stderr,
                flush=True,
            )
        start = time.perf_counter()
        module = cpp_extension.load(
            name=name,
            sources=[str(_SOURCE)],
            extra_cflags=flags,
            build_directory=str(build_dir),
            verbose=False,
        )
        if not cached:
            print(
                f"rnndrop: LSTM loop kernel built in {time.perf_counter() - start:.0f} s",
                file=sys.stderr,
                flush=True,
            )
        return module
    except Exception as err:  # any failure means: use the pure-PyTorch loop
        warnings.warn(
            f"rnndrop: could not build the C++ LSTM loop ({type(err).__name__}: {err}); "
            "using the pure-PyTorch loop instead (correct, slower).",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
