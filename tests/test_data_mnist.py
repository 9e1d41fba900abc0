import gzip
import math
import struct
from pathlib import Path

import pytest
import torch

from rnndrop.data.mnist import MNISTError, PixelMNIST, load_mnist, read_idx


def idx_bytes(array: torch.Tensor, magic: int | None = None) -> bytes:
    magic = magic if magic is not None else 0x0800 + array.dim()
    header = struct.pack(">i", magic) + b"".join(struct.pack(">i", s) for s in array.shape)
    return header + array.to(torch.uint8).numpy().tobytes()


def write_mnist(root: Path, n_train: int = 12, n_test: int = 5) -> tuple[torch.Tensor, ...]:
    """Fake MNIST: image i of a split has pixel j = (i + j) % 256; labels i % 10."""
    root.mkdir(parents=True, exist_ok=True)
    out = []
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = (torch.arange(n)[:, None] + torch.arange(784)[None]) % 256
        images = images.view(n, 28, 28)
        labels = torch.arange(n) % 10
        for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
            (root / f"{prefix}-{kind}-ubyte.gz").write_bytes(gzip.compress(idx_bytes(array)))
        out += [images, labels]
    return tuple(out)


def test_read_idx_and_load(tmp_path):
    images, _, test_images, _ = write_mnist(tmp_path)
    got = read_idx(tmp_path / "train-images-idx3-ubyte.gz", 3)
    assert got.dtype == torch.uint8 and torch.equal(got.long(), images)
    imgs, labs = load_mnist(tmp_path, "test")
    assert imgs.shape == (5, 28, 28) and torch.equal(imgs.long(), test_images)
    assert labs.dtype == torch.long and labs.tolist() == [0, 1, 2, 3, 4]
    raw = tmp_path / "raw"  # decompressed files work too
    raw.mkdir()
    for p in tmp_path.glob("*.gz"):
        (raw / p.name.removesuffix(".gz")).write_bytes(gzip.decompress(p.read_bytes()))
    assert torch.equal(load_mnist(raw, "train")[0], got)


def test_sequential_and_rows(tmp_path):
    write_mnist(tmp_path)
    ds = PixelMNIST(tmp_path, "train")
    x, y = ds[3]
    assert x.shape == (784, 1) and x.dtype == torch.float32 and y.item() == 3
    expected = ((3 + torch.arange(784)) % 256).float() / 255  # row-major pixel order
    assert torch.allclose(x[:, 0], expected)
    assert x.min() >= 0.0 and x.max() <= 1.0
    xr, _ = PixelMNIST(tmp_path, "train", rows=True)[3]
    assert xr.shape == (28, 28) and torch.allclose(xr[1], expected[28:56])
    assert (ds.input_size, ds.seq_len, ds.num_classes, ds.target) == (1, 784, 10, "last")
    assert ds.baseline_loss == pytest.approx(math.log(10))


def test_permuted_is_one_fixed_permutation(tmp_path):
    write_mnist(tmp_path)
    seq = PixelMNIST(tmp_path, "train")
    perm = PixelMNIST(tmp_path, "train", permuted=True, perm_seed=1)
    order = perm.permutation
    assert sorted(order.tolist()) == list(range(784)) and order.tolist() != list(range(784))
    for i in (0, 5):  # the same pixel order for every image, and in the test split
        assert torch.equal(perm[i][0][:, 0], seq[i][0][order, 0])
    test = PixelMNIST(tmp_path, "test", permuted=True, perm_seed=1)
    assert torch.equal(test.permutation, order)
    assert torch.equal(PixelMNIST(tmp_path, permuted=True, perm_seed=1).permutation, order)
    assert not torch.equal(PixelMNIST(tmp_path, permuted=True, perm_seed=2).permutation, order)
    rows = PixelMNIST(tmp_path, "train", permuted=True, perm_seed=1, rows=True)
    assert torch.equal(rows[2][0].reshape(784), perm[2][0][:, 0])


def test_indices_subset(tmp_path):
    write_mnist(tmp_path)
    sub = PixelMNIST(tmp_path, "train", indices=torch.tensor([7, 2]))
    assert len(sub) == 2 and sub[0][1].item() == 7 and sub[1][1].item() == 2


# corrupt and truncated files: each error names the file and what was expected -------------------
def test_wrong_magic(tmp_path):
    write_mnist(tmp_path)
    labels = tmp_path / "train-labels-idx1-ubyte.gz"
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(labels.read_bytes())
    with pytest.raises(MNISTError, match=r"train-images-idx3-ubyte\.gz is not a 3-d.*2049.*2051"):
        load_mnist(tmp_path, "train")


def test_truncated_gzip(tmp_path):
    write_mnist(tmp_path)
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(MNISTError, match=r"corrupt or truncated gzip file .*t10k-images"):
        load_mnist(tmp_path, "test")


def test_truncated_data_and_not_gzip(tmp_path):
    path = tmp_path / "x-images.gz"
    data = idx_bytes(torch.zeros(4, 28, 28))
    path.write_bytes(gzip.compress(data[:-100]))
    with pytest.raises(MNISTError, match=r"truncated idx file .*x-images\.gz.*\(4, 28, 28\)"):
        read_idx(path, 3)
    path.write_bytes(b"<html>403 Forbidden</html>")
    with pytest.raises(MNISTError, match=r"corrupt or truncated gzip file .*x-images\.gz"):
        read_idx(path, 3)
    path.write_bytes(gzip.compress(data[:6]))
    with pytest.raises(MNISTError, match=r"shorter than the 16-byte header"):
        read_idx(path, 3)


def test_mismatched_counts(tmp_path):
    write_mnist(tmp_path)
    labels = torch.arange(11) % 10
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(labels)))
    with pytest.raises(MNISTError, match=r"has 12 images but .*train-labels.* has 11 labels"):
        load_mnist(tmp_path, "train")


def test_missing_files_and_layout(tmp_path):
    with pytest.raises(MNISTError, match=r"nowhere does not exist"):
        load_mnist(tmp_path / "nowhere", "train")
    (tmp_path / "ptb.train.txt").write_text("a\n")
    with pytest.raises(MNISTError, match=r"wrong directory layout .*missing train-images"):
        load_mnist(tmp_path, "train")
