"""Which optional dependencies belong to which extra, and the error that names the extra.

``rnndrop.nn``, ``functional`` and ``config`` need torch alone; the training layer
(``rnndrop.lit``), the studies and the data modules need the ``train`` extra. Importing one of
those without it should say what to install, not end in a bare ``ModuleNotFoundError``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from contextlib import contextmanager

#: Top-level modules that only the ``train`` extra installs.
TRAIN_EXTRA: tuple[str, ...] = (
    "lightning", "pytorch_lightning", "torchmetrics", "tensorboard", "jsonargparse",
    "matplotlib", "yaml", "numpy", "tqdm",
)  # fmt: skip
INSTALL_TRAIN = 'pip install "rnndrop[train]"'


def missing_train_module(err: ModuleNotFoundError) -> bool:
    """True if ``err`` is about a module of the ``train`` extra."""
    return err.name is not None and err.name.split(".")[0] in TRAIN_EXTRA


@contextmanager
def needs_train_extra(package: str) -> Iterator[None]:
    """Turn a missing ``train`` module imported inside into an error naming the extra.

    The error stays a ``ModuleNotFoundError`` with the missing module's ``name``, so code
    that handles the bare one (``rnndrop``'s command) still does.
    """
    try:
        yield
    except ModuleNotFoundError as err:
        if not missing_train_module(err):
            raise
        raise ModuleNotFoundError(
            f"{package} needs {err.name!r}, part of rnndrop's 'train' extra; install it with: "
            f"{INSTALL_TRAIN}",
            name=err.name,
        ) from err


def require_train_extra(package: str, modules: tuple[str, ...] = ("lightning", "numpy")) -> None:
    """Raise the error of :func:`needs_train_extra` now if one of ``modules`` is missing.

    For a package that imports its heavy dependencies lazily (inside functions, for a fast
    command line): finding a module imports nothing.
    """
    for name in modules:
        if importlib.util.find_spec(name) is None:
            with needs_train_extra(package):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
