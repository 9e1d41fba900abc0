"""The compiled loop splits each step's batch rows over ATen's intra-op threads (issue 22).

Rows are independent, so a split must give what the python loop gives; a race (a shared
scratch row, a mask gradient written by two threads) would not. The sizes are chosen so that
every cell's rows do split at two threads (the loop's chunks hold at least 2048 elements).
"""

from __future__ import annotations

import pytest
import torch

from rnndrop import runtime
from rnndrop.config import SITES, RecurrentDropout
from rnndrop.kernels import loop_backend
from rnndrop.kernels.cpp import build
from rnndrop.nn import GRU, LSTM, RNN, LayerNormLSTM

pytestmark = pytest.mark.skipif(
    build.disabled() or build.load() is None, reason="needs the compiled loop"
)

# batch 96 x hidden 32: >= 2 chunks for every cell (an Elman row is 32 elements, an LSTM's 128)
I, H, T, B = 8, 32, 6, 96

CELL_MODULES = [LSTM, LayerNormLSTM, GRU, RNN]


def every_site(cls, concrete: bool, time: str = "per_step") -> RecurrentDropout:
    """Every site the cell has that acts inside one layer (derived from SITES: a new site is
    in this test without an edit), untied where the cell has gates to untie."""
    cell = cls(1, 1).cell
    rates = {name: 0.2 for name, site in SITES.items()
             if site.path != "model" and site.layers != "inner"
             and (site.cells is None or cell.name in site.cells)}  # fmt: skip
    return RecurrentDropout(**rates, tied=cell.gates == 1, time=time, concrete=concrete)


def run(cls, dropout: RecurrentDropout, backend: str, dtype=torch.float64):
    torch.manual_seed(0)
    m = cls(I, H, dropout=dropout).to(dtype)
    x = torch.randn(T, B, I, dtype=dtype, requires_grad=True)
    with loop_backend(backend):
        torch.manual_seed(1)  # the same masks on both backends
        out, state = m(x)
        last = state[-1] if isinstance(state, tuple) else state
        (out.pow(2).sum() + last.sum()).backward()
    grads = [x.grad] + [p.grad for p in m.parameters()]
    return [out, *grads]


@pytest.mark.parametrize("cls", CELL_MODULES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("time", ["per_step", "per_sequence"])
@pytest.mark.parametrize("concrete", [False, True], ids=["masks", "concrete"])
def test_split_rows_match_the_python_loop(cls, concrete, time, two_threads):
    dropout = every_site(cls, concrete, time)
    got, want = run(cls, dropout, "cpp"), run(cls, dropout, "python")
    for g, w in zip(got, want, strict=True):
        assert g is not None and w is not None
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10)


def test_split_rows_flush_subnormals_on_the_worker_thread_too(two_threads):
    # a 300-step BPTT whose loss reads the last step only: the input gradient decays through
    # the subnormal range; each worker's rows must be flushed like the caller's
    torch.manual_seed(0)
    m = LSTM(I, H, dropout=RecurrentDropout.variational(0.25, tied=False))
    x = torch.randn(300, B, I, requires_grad=True)
    with runtime.flush_subnormals(None), loop_backend("cpp"):  # the loop flushes inside
        out, _ = m(x)
        out[-1].sum().backward()
    tiny = torch.finfo(torch.float32).tiny
    assert int(((x.grad != 0) & (x.grad.abs() < tiny)).sum()) == 0
    assert (x.grad[0] == 0).all() and (x.grad[-1] != 0).any()  # decayed to zero, not lost
