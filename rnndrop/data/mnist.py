"""Sequential and permuted pixel MNIST from the four standard idx ``.gz`` files.

Sequential MNIST (Le et al. 2015): the 28x28 image is read one pixel per step (784 steps,
row by row) and the class is predicted after the last step. Permuted MNIST applies one fixed,
seeded permutation to the pixel order first, which spreads dependencies over the whole
sequence. ``rows=True`` reads a row per step instead (28 steps of 28 pixels), for quick runs.
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

__all__ = ["FILES", "MNISTError", "PixelMNIST", "load_mnist", "permutation", "read_idx"]

FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_MAGIC = {3: 2051, 1: 2049}  # ndim -> magic number of a uint8 idx file (0x0803, 0x0801)


class MNISTError(ValueError):
    """An MNIST file is missing, truncated, corrupt or not the expected idx file."""


def read_idx(path: str | os.PathLike, ndim: int) -> Tensor:
    """Read a uint8 idx file (gzip-compressed if its name ends in ``.gz``) as a uint8 tensor.

    The idx format: a big-endian int32 magic ``0x0800 + ndim`` (uint8 data), ``ndim`` big-endian
    int32 sizes, then the data. Everything is checked against the file's length.

    Args:
        path: the file.
        ndim: expected number of dimensions (3 for images, 1 for labels).
    """
    path = Path(path)
    if not path.is_file():
        raise MNISTError(f"missing file: {path} does not exist")
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                data = f.read()
        else:
            data = path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError
        raise MNISTError(
            f"corrupt or truncated gzip file {path}: {e}; expected a gzip-compressed idx file "
            "(delete it and download again)"
        ) from None
    expected_magic = _MAGIC[ndim]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise MNISTError(
            f"truncated idx file {path}: {len(data)} bytes, shorter than the {header}-byte header"
        )
    magic = int.from_bytes(data[:4], "big")
    if magic != expected_magic:
        raise MNISTError(
            f"{path} is not a {ndim}-d uint8 idx file: magic number {magic} (0x{magic:08x}), "
            f"expected {expected_magic} (0x{expected_magic:08x})"
        )
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    size = math.prod(shape)
    if len(data) - header != size:
        raise MNISTError(
            f"{'truncated' if len(data) - header < size else 'oversized'} idx file {path}: header "
            f"says shape {shape} ({size} bytes of data), the file has {len(data) - header}"
        )
    array = np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)
    return torch.from_numpy(array.copy())


@lru_cache(maxsize=4)
def _load_cached(images_file: Path, labels_file: Path, stamp: tuple) -> tuple[Tensor, Tensor]:
    images = read_idx(images_file, 3)
    labels = read_idx(labels_file, 1).long()
    if images.shape[1:] != (28, 28):
        raise MNISTError(f"{images_file}: images are {tuple(images.shape[1:])}, expected (28, 28)")
    if images.shape[0] != labels.shape[0]:
        raise MNISTError(
            f"{images_file} has {images.shape[0]} images but {labels_file} has "
            f"{labels.shape[0]} labels; expected the same number"
        )
    if labels.numel() and int(labels.max()) > 9:
        raise MNISTError(f"{labels_file}: label {int(labels.max())} is not a digit 0-9")
    return images, labels


def _resolve(name: str, root: Path) -> Path:
    """``name`` in ``root``, or the same file without ``.gz`` (already decompressed copies)."""
    path = root / name
    if not path.exists() and (root / name.removesuffix(".gz")).exists():
        return root / name.removesuffix(".gz")
    return path


def load_mnist(root: str | os.PathLike, split: Literal["train", "test"]) -> tuple[Tensor, Tensor]:
    """Images ``(N, 28, 28)`` uint8 and labels ``(N,)`` int64 of a split.

    ``root`` holds the four standard files (``train-images-idx3-ubyte.gz`` etc., or their
    decompressed versions). Results are cached per process.
    """
    if split not in FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root)
    if not root.is_dir():
        raise MNISTError(
            f"MNIST directory {root} does not exist; expected a directory with "
            f"{', '.join(FILES[split])}"
        )
    paths = [_resolve(n, root) for n in FILES[split]]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        present = ", ".join(sorted(p.name for p in root.iterdir())[:8]) or "nothing"
        raise MNISTError(
            f"wrong directory layout in {root}: missing {', '.join(missing)} (expected the four "
            f"MNIST idx files {', '.join(FILES['train'] + FILES['test'])}; found {present})"
        )
    stamp = tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in paths)
    return _load_cached(paths[0].resolve(), paths[1].resolve(), stamp)


class PixelMNIST(Dataset):
    """Pixel-by-pixel MNIST (Le et al. 2015), optionally permuted or read a row per step.

    Items are ``(x, y)``: ``x`` float in [0, 1] of shape ``(784, 1)`` (or ``(28, 28)`` with
    ``rows=True``), ``y`` the digit as a scalar LongTensor, predicted after the last step.
    ``permuted=True`` reorders the 784 pixels by ``torch.randperm(784)`` from a generator seeded
    with ``perm_seed``: one permutation, the same for every image, split and run (with
    ``rows=True`` the permuted pixels are then cut into 28 rows).

    ``baseline_loss`` is ``ln 10``, the uniform guess; the best constant guess (the label
    frequencies) is 2.3012 nats on the training set, 0.0014 below.

    Args:
        root: directory with the four idx files (see :func:`rnndrop.data.download.fetch`).
        split: ``"train"`` or ``"test"``.
        permuted: apply the fixed pixel permutation.
        rows: 28 steps of 28 pixels instead of 784 steps of 1.
        perm_seed: seed of the permutation.
        indices: use only these image indices (e.g. a train/val split).
    """

    input_kind = "float"
    target = "last"
    loss = "cross_entropy"
    vocab_size = None
    num_classes = 10
    output_size = 10
    baseline_loss = math.log(10)

    def __init__(
        self,
        root: str | os.PathLike,
        split: Literal["train", "test"] = "train",
        *,
        permuted: bool = False,
        rows: bool = False,
        perm_seed: int = 0,
        indices: Tensor | None = None,
    ) -> None:
        self.images, self.labels = load_mnist(root, split)
        self.indices = indices
        self.split, self.permuted, self.rows, self.perm_seed = split, permuted, rows, perm_seed
        self.permutation = permutation(perm_seed) if permuted else None
        self.input_size = 28 if rows else 1
        self.seq_len = self.distance = 28 if rows else 784
        self.name = ("p" if permuted else "s") + "mnist" + ("_rows" if rows else "")

    def __len__(self) -> int:
        return len(self.labels) if self.indices is None else len(self.indices)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        if self.indices is not None:
            index = int(self.indices[index])
        x = self.images[index].reshape(784).float().div_(255.0)
        if self.permutation is not None:
            x = x[self.permutation]
        return x.view(28, 28) if self.rows else x.view(784, 1), self.labels[index]


def permutation(seed: int) -> Tensor:
    """The fixed pixel order of permuted MNIST for ``seed``."""
    return torch.randperm(784, generator=torch.Generator().manual_seed(seed))
