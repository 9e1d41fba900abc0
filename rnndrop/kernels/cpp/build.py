"""Build-on-first-use loader for the optional C++ loop kernel (``loop.cpp`` and its headers).

The kernel is never required: :func:`load` returns ``None`` when it is disabled
(``RNNDROP_EXTENSION=0``), when no compiler or ninja is available, or when the build
fails, and ``auto`` then runs the ``python`` backend. Every build is announced on stderr
(~30-60 s once). The cache lives under ``$TORCH_EXTENSIONS_DIR`` (default
``~/.cache/torch_extensions``) in a folder whose name hashes everything the binary depends
on: the sources, the compiler flags (CPU capability, and the per-step masks' order from
:class:`~rnndrop.kernels.contract.LayerMasks`), the torch version *and installation path*,
and the Python build. Two environments with the same torch version therefore keep
two builds side by side instead of rebuilding each other's; a folder that holds its
library is loaded as it is, never rebuilt.
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

from ..contract import LayerMasks

__all__ = ["available", "disabled", "load", "loaded", "why_unavailable"]

_DIR = Path(__file__).resolve().parent
_SOURCE = _DIR / "loop.cpp"
_lock = threading.Lock()
_state: dict[str, object] = {}


def disabled() -> bool:
    """True if ``RNNDROP_EXTENSION`` is set to 0/false/off/no."""
    return os.environ.get("RNNDROP_EXTENSION", "1").strip().lower() in {"0", "false", "off", "no"}


def _flags() -> list[str]:
    # Explicit ISA flags (not -march=native) so the cache key names what the code needs.
    # -fopenmp: at::parallel_for is a header template; without it the template runs serially
    # and the subnormal setting would reach only the calling thread. No -lgomp: its symbols
    # resolve to the libgomp that libtorch already loaded (one OpenMP pool, not two).
    flags = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-fopenmp"]
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
    return flags + _step_mask_defines()


def _step_mask_defines() -> list[str]:
    """The per-step masks as ``step_masks.h`` takes them: their names in the adapter's order
    (``LayerMasks.step_names()``) and the value of an absent one. Generated here, so a site
    added to :class:`~rnndrop.kernels.contract.LayerMasks` is a new position in the kernel
    (and a new cache key) without an edit to ``loop.cpp``."""
    names = LayerMasks.step_names()
    absent = [LayerMasks.absent(n) for n in names]
    bad = [n for n in names if not n.isidentifier() or not n.isascii()]
    if bad or any(a not in (0, 1) for a in absent):
        raise ValueError(
            f"LayerMasks' step fields must be C identifiers whose absent value is 0 "
            f"or 1 (the rows loop.cpp has): {dict(zip(names, absent, strict=True))}"
        )
    return [f"-DRNNDROP_STEP_MASKS={','.join(names)}",
            f"-DRNNDROP_STEP_MASK_ABSENT={','.join(map(str, absent))}"]  # fmt: skip


def _is_x86() -> bool:
    import platform

    return platform.machine().lower() in {"x86_64", "amd64"}


def _sources() -> list[Path]:
    return sorted([*_DIR.glob("*.cpp"), *_DIR.glob("*.h")])


def _name(flags: list[str]) -> str:
    """The cache key: sources, flags, torch version and installation, Python build."""
    h = hashlib.sha256()
    for path in _sources():
        h.update(path.name.encode())
        h.update(path.read_bytes())
    h.update(" ".join(flags).encode())
    h.update(torch.__version__.encode())
    h.update(str(Path(torch.__file__).resolve().parent).encode())
    h.update(sys.version.encode())
    return f"rnndrop_loop_{h.hexdigest()[:16]}"


def _import_built(name: str, build_dir: Path) -> ModuleType | None:
    """The module a previous build left in ``build_dir``, imported without asking ninja."""
    import importlib.util

    for path in sorted(build_dir.glob(f"{name}*.so")):
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            continue
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    return None


@torch.compiler.disable  # never traced: file hashing, a lock and a build (dynamo warnings)
def load() -> ModuleType | None:
    """The compiled module, building it on first call; ``None`` if unavailable."""
    if disabled():
        return None
    with _lock:
        if "module" in _state:
            return _state["module"]  # type: ignore[return-value]
        _state["module"] = module = _build()
        if module is not None and _mode_off():
            module.set_loop_flush(False)  # rnndrop.set_flush_subnormals(False) came first
        return module


def _mode_off() -> bool:
    from ...runtime import flush_subnormals_mode

    return flush_subnormals_mode() is False


def loaded() -> ModuleType | None:
    """The compiled module if it is already loaded in this process; never builds."""
    return None if disabled() else _state.get("module")  # type: ignore[return-value]


def why_unavailable() -> str | None:
    """None if the kernel is loaded (builds it if needed), else the reason in a few words."""
    if disabled():
        return "RNNDROP_EXTENSION=0 disables the compiled kernel"
    if load() is None:
        return str(_state.get("error", "the compiled kernel could not be loaded"))
    return None


def available() -> bool:
    """True if the compiled loop can be used (builds it if needed)."""
    return load() is not None


def _build() -> ModuleType | None:
    if not _SOURCE.exists():
        return None
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        _state["error"] = "no C++ compiler was found (install g++)"
        warnings.warn(
            "rnndrop: no C++ compiler found; the loop path runs in pure PyTorch "
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
        module = _import_built(name, build_dir)
        if module is not None:
            return module
        print(
            f"rnndrop: compiling the loop kernel (every rnndrop.nn cell) for this torch "
            f"installation (once, ~30-60 s; cached in {build_dir}; RNNDROP_EXTENSION=0 skips it)",
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
        print(
            f"rnndrop: loop kernel built in {time.perf_counter() - start:.0f} s",
            file=sys.stderr,
            flush=True,
        )
        return module
    except Exception as err:  # any failure means: use the pure-PyTorch loop
        _state["error"] = f"its build failed ({type(err).__name__}: {err})"
        warnings.warn(
            f"rnndrop: could not build the C++ loop kernel ({type(err).__name__}: {err}); "
            "the loop path runs in pure PyTorch instead (correct, slower).",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
