import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # tests/reference.py


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(params=["cpp", "python"])
def loop_impl(request, monkeypatch):
    """Run a test with the compiled C++ loop and again with the pure-PyTorch loop."""
    if request.param == "python":
        monkeypatch.setenv("RNNDROP_LOOP", "python")
    else:
        from rnndrop import _ext

        if _ext.disabled():
            pytest.skip("RNNDROP_EXTENSION=0: compiled loop disabled")
        assert _ext.load() is not None, "the C++ loop kernel failed to build"
        monkeypatch.delenv("RNNDROP_LOOP", raising=False)
    return request.param


def shared_data_dir() -> Path | None:
    """../shared/data (or $RNNDROP_SHARED_DATA) if present: opt-in tests on real corpora."""
    env = os.environ.get("RNNDROP_SHARED_DATA")
    path = Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"
    return path if path.is_dir() else None
