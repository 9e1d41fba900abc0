"""Data for rnndrop: corpora, vocabulary, LM batching, downloader, synthetic tasks, MNIST.

Everything here needs only torch and numpy, except the LightningDataModules
(:mod:`rnndrop.data.modules`), which are imported on first access so that
``python -m rnndrop.data.download`` and the datasets stay light.
"""

from __future__ import annotations

from typing import Any

from .._extras import needs_train_extra

with needs_train_extra("rnndrop.data"):  # numpy: an error naming the extra without it
    from .batching import BPTTBatches, batchify, variable_lengths
    from .corpus import (
        Corpus,
        CorpusError,
        load_ptb,
        load_text_folder,
        load_wikitext2,
        read_tokens,
    )
    from .download import REGISTRY, ChecksumError, DownloadError, fetch
    from .mnist import MNISTError, PixelMNIST, load_mnist
    from .synthetic import (
        TASKS,
        AddingTask,
        AssociativeRecall,
        CopyTask,
        DelayedRecall,
        SelectiveCopy,
        SyntheticTask,
        make_task,
    )
    from .vocab import UnknownTokenError, Vocab

#: data problems a user fixes (a missing or corrupt corpus): the CLIs print them in one line
DATA_ERRORS: tuple[type[Exception], ...] = (
    CorpusError, DownloadError, MNISTError, UnknownTokenError,
)  # fmt: skip

_LAZY = ("LanguageModelDataModule", "PixelMNISTDataModule", "SyntheticDataModule")

__all__ = [
    "DATA_ERRORS",
    "REGISTRY",
    "TASKS",
    "AddingTask",
    "AssociativeRecall",
    "BPTTBatches",
    "ChecksumError",
    "CopyTask",
    "Corpus",
    "CorpusError",
    "DelayedRecall",
    "DownloadError",
    "LanguageModelDataModule",
    "MNISTError",
    "PixelMNIST",
    "PixelMNISTDataModule",
    "SelectiveCopy",
    "SyntheticDataModule",
    "SyntheticTask",
    "UnknownTokenError",
    "Vocab",
    "batchify",
    "fetch",
    "load_mnist",
    "load_ptb",
    "load_text_folder",
    "load_wikitext2",
    "make_task",
    "read_tokens",
    "variable_lengths",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:  # Lightning is imported only when a DataModule is asked for
        with needs_train_extra(f"rnndrop.data.{name}"):
            from . import modules

        return getattr(modules, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
