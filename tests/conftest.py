import os
import sys
from pathlib import Path

# The tests' tensors are tiny: intra-op threads only add synchronisation, and on a 2-core
# machine with anything else running, two spin-waiting threads per process thrash (measured
# here: a 64-unit LSTM step took 1754 ms with 2 threads against 22 ms with 1 under load).
# Subprocesses (CLI and study tests) inherit the setting; set OMP_NUM_THREADS to override.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

sys.path.insert(0, str(Path(__file__).parent))  # tests/reference.py


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
    # a task's fit turns subnormal flushing on for the process (rnndrop.runtime): every test
    # starts from the library's default instead of the previous test's
    from rnndrop import runtime

    runtime._applied = False
    if runtime.flush_subnormals_mode() is not None:
        runtime.set_flush_subnormals(None)


@pytest.fixture(params=["cpp", "python"])
def loop_impl(request, monkeypatch):
    """Run a test with the compiled C++ loop and again with the pure-PyTorch loop."""
    if request.param == "cpp":
        from rnndrop.kernels.cpp import build

        if build.disabled():
            pytest.skip("RNNDROP_EXTENSION=0: compiled loop disabled")
        assert build.load() is not None, "the C++ loop kernel failed to build"
    monkeypatch.setenv("RNNDROP_LOOP", request.param)
    return request.param


def shared_data_dir() -> Path | None:
    """$RNNDROP_SHARED_DATA if set and present: opt-in tests on real corpora.

    ``RNNDROP_SHARED_DATA=../shared/data pytest -m shared_data``; the default run never reads
    real corpora, even where a copy sits next to the checkout.
    """
    env = os.environ.get("RNNDROP_SHARED_DATA")
    return Path(env) if env and Path(env).is_dir() else None


@pytest.fixture
def two_threads():
    """torch's intra-op pool at two threads for one test (the compiled loop then splits rows,
    and an elementwise op large enough runs half on a worker thread)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def text_corpus(tmp_path):
    """A tiny train/valid/test word corpus (8 letters as words), generated."""
    import random

    rng = random.Random(0)
    root = tmp_path / "corpus"
    root.mkdir()
    for split, lines in (("train", 200), ("valid", 30), ("test", 30)):
        text = "\n".join(" ".join(rng.choice("abcdefgh") for _ in range(9)) for _ in range(lines))
        (root / f"{split}.txt").write_text(text + "\n")
    return root


@pytest.fixture
def fake_mnist(tmp_path, monkeypatch):
    """Four idx.gz files of random images; the sha256 check is bypassed for them only."""
    import gzip
    import struct

    root = tmp_path / "mnist"
    root.mkdir()
    for prefix, n in (("train", 40), ("t10k", 10)):
        images = torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8)
        labels = (torch.arange(n) % 10).to(torch.uint8)
        for kind, arr, magic in (("images-idx3", images, 2051), ("labels-idx1", labels, 2049)):
            header = struct.pack(">i", magic) + b"".join(struct.pack(">i", s) for s in arr.shape)
            (root / f"{prefix}-{kind}-ubyte.gz").write_bytes(
                gzip.compress(header + arr.numpy().tobytes())
            )
    monkeypatch.setattr("rnndrop.data.modules.fetch", lambda name, d, download=False: root)
    return root
