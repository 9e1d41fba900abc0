"""Subnormal floats in backprop through time (issue 22): where they are flushed, where kept.

The checks count subnormal values directly (0 < |v| < finfo.tiny) instead of timing them, so
they hold on any CPU; the speed they buy is an Intel one (scripts/bench_rnn.py measures it).
"""

from __future__ import annotations

import pytest
import torch

from rnndrop import runtime
from rnndrop.kernels import loop_backend
from rnndrop.kernels.cpp import build
from rnndrop.nn import GRU, LSTM

needs_ext = pytest.mark.skipif(
    build.disabled() or build.load() is None,
    reason="the compiled helper sets the mode on every thread",
)
FLUSH_CAPABLE = __import__("platform").machine().lower() in {"x86_64", "amd64", "aarch64"}


def subnormals(t: torch.Tensor) -> int:
    return int(((t != 0) & (t.abs() < torch.finfo(t.dtype).tiny)).sum())


def bptt_grads(cls, backend: str, dropout, mode) -> tuple[torch.Tensor, torch.Tensor]:
    """x.grad and W_hh.grad of a 400-step BPTT whose loss reads only the last step: the input
    gradient decays through time across the whole subnormal range (seeded)."""
    torch.manual_seed(0)
    m = cls(8, 16, dropout=dropout)
    x = torch.randn(400, 4, 8, requires_grad=True)
    with runtime.flush_subnormals(mode), loop_backend(backend):
        out, _ = m(x)
        out[-1].sum().backward()
    return x.grad, m.weight_hh_l0.grad


@pytest.mark.skipif(not FLUSH_CAPABLE, reason="no flush-to-zero mode on this CPU")
@needs_ext
@pytest.mark.parametrize("cls", [LSTM, GRU])
@pytest.mark.parametrize("backend", ["python", "cpp"])
def test_bptt_gradients_hold_no_subnormals_with_the_switch_and_some_without(cls, backend):
    dropout = {"preset": "variational", "p": 0.25}
    dx_on, dw_on = bptt_grads(cls, backend, dropout, True)
    dx_off, _ = bptt_grads(cls, backend, dropout, False)
    assert subnormals(dx_off) > 50, "the seeded case must produce subnormals when kept"
    assert subnormals(dx_on) == 0 and subnormals(dw_on) == 0
    # flushing changes only what lies below the smallest normal float
    tiny = torch.finfo(dx_off.dtype).tiny
    torch.testing.assert_close(dx_on, dx_off, rtol=2e-5, atol=100 * tiny)
    # the default: the compiled loop flushes inside its calls, the python loop keeps them
    dx_default, _ = bptt_grads(cls, backend, dropout, None)
    assert (subnormals(dx_default) == 0) == (backend == "cpp")


@pytest.mark.skipif(not FLUSH_CAPABLE, reason="no flush-to-zero mode on this CPU")
@needs_ext
def test_fused_path_backward_is_flushed_by_the_switch():
    dropout = {"recurrent": 0.25, "output": 0.25, "batch": "per_batch"}  # folded into W_hh
    dx_on, _ = bptt_grads(LSTM, "auto", dropout, True)
    dx_off, _ = bptt_grads(LSTM, "auto", dropout, False)
    assert subnormals(dx_off) > 50 and subnormals(dx_on) == 0


@pytest.mark.skipif(not FLUSH_CAPABLE, reason="no flush-to-zero mode on this CPU")
@needs_ext
def test_the_switch_reaches_every_intra_op_thread(two_threads):
    # torch.set_flush_denormal sets the calling thread only: an elementwise op split over two
    # OpenMP threads then keeps subnormals in the half the worker computes
    x = torch.full((1 << 20,), 1e-39)  # subnormal input, above the grain of one thread
    torch.set_flush_denormal(True)
    try:
        assert 0 < subnormals(x * 0.5) < x.numel(), "expected a worker thread to keep them"
    finally:
        torch.set_flush_denormal(False)
    with runtime.flush_subnormals(True):
        assert subnormals(x * 0.5) == 0
        assert runtime.flushing_subnormals()
    assert subnormals(x * 0.5) == x.numel()  # restored on every thread
    assert not runtime.flushing_subnormals()


@pytest.mark.skipif(not FLUSH_CAPABLE, reason="no flush-to-zero mode on this CPU")
@needs_ext
def test_the_compiled_loop_restores_the_callers_setting(two_threads):
    x = torch.full((1 << 20,), 1e-39)
    bptt_grads(LSTM, "cpp", {"preset": "zoneout"}, None)  # flushes inside its calls only
    assert not runtime.flushing_subnormals()
    assert subnormals(x * 0.5) == x.numel()


def test_mode_is_checked_and_restored():
    with pytest.raises(ValueError, match="True, False or None"):
        runtime.set_flush_subnormals("yes")  # type: ignore[arg-type]
    assert runtime.flush_subnormals_mode() is None
    with runtime.flush_subnormals(False):
        assert runtime.flush_subnormals_mode() is False
        with runtime.flush_subnormals(True):
            assert runtime.flush_subnormals_mode() is True
        assert runtime.flush_subnormals_mode() is False
    assert runtime.flush_subnormals_mode() is None


def test_training_defaults_respect_the_users_choice_and_the_opt_out(monkeypatch):
    calls = []
    monkeypatch.setattr(runtime, "tune_allocator", lambda: calls.append("allocator"))
    runtime.training_defaults()
    assert calls == ["allocator"] and runtime.flush_subnormals_mode() is True
    runtime.training_defaults()  # once per process
    assert calls == ["allocator"]

    runtime.set_flush_subnormals(None)
    monkeypatch.setattr(runtime, "_applied", False)
    runtime.set_flush_subnormals(False)  # the user's explicit choice wins
    runtime.training_defaults()
    assert runtime.flush_subnormals_mode() is False

    runtime.set_flush_subnormals(None)
    monkeypatch.setattr(runtime, "_applied", False)
    monkeypatch.setenv("RNNDROP_FLUSH_SUBNORMALS", "0")
    runtime.training_defaults()
    assert runtime.flush_subnormals_mode() is None


def test_a_task_in_a_plain_trainer_gets_the_training_defaults(tmp_path, monkeypatch):
    import lightning as L

    from rnndrop.data import SyntheticDataModule
    from rnndrop.lit import SequenceTask
    from rnndrop.models import SequenceModel

    calls = []
    monkeypatch.setattr(runtime, "tune_allocator", lambda: calls.append("allocator") or True)
    dm = SyntheticDataModule("delayed_recall", distance=3, train_size=16, val_size=8,
                             batch_size=8)  # fmt: skip
    net = SequenceModel("tokens", vocab_size=dm.vocab_size, output_size=dm.num_classes,
                        hidden_size=8)  # fmt: skip
    task = SequenceTask(net)
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path, limit_val_batches=1)  # fmt: skip
    trainer.fit(task, datamodule=dm)
    assert calls == ["allocator"]
    assert runtime.flush_subnormals_mode() is True


def test_machine_names_the_cpu_and_the_setting():
    m = runtime.machine()
    assert m["threads"] == torch.get_num_threads() and m["torch"] == torch.__version__
    assert isinstance(m["features"], list) and m["cpu"]
    line = runtime.describe_machine()
    assert m["cpu"] in line and "subnormals kept" in line
    with runtime.flush_subnormals(True):
        assert ("subnormals flushed" in runtime.describe_machine()) == FLUSH_CAPABLE
