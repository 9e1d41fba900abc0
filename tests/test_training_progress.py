"""Progress display: plain periodic lines when the output is not a terminal (SLURM, CI), a
bar refreshed every few steps on a terminal, nothing when the user turned it off."""

import io
import sys
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar

from rnndrop.data import SyntheticDataModule
from rnndrop.lit import LineProgress, SequenceTask
from rnndrop.lit.cli import make_cli, progress_display
from rnndrop.models import SequenceModel

EXP = Path(__file__).resolve().parents[1] / "experiments"


def test_display_follows_the_terminal(monkeypatch):
    for stream in (sys.stdout, sys.stderr):
        monkeypatch.setattr(stream, "isatty", lambda: True)
    bar = progress_display([], None)
    assert isinstance(bar, TQDMProgressBar) and bar.refresh_rate == 10
    monkeypatch.setattr(sys.stdout, "isatty", lambda: False)  # stdout to a file
    assert isinstance(progress_display([], None), LineProgress)
    assert progress_display([], False) is None  # enable_progress_bar: false
    mine = TQDMProgressBar()
    assert progress_display([mine], None) is None  # the user's own display wins


def test_line_progress_writes_plain_lines_with_the_metrics():
    out = io.StringIO()
    dm = SyntheticDataModule("delayed_recall", distance=3, train_size=64, val_size=16,
                             batch_size=8)  # fmt: skip
    net = SequenceModel("tokens", vocab_size=dm.vocab_size, output_size=dm.num_classes,
                        hidden_size=8, embedding_size=4)  # fmt: skip
    trainer = L.Trainer(max_epochs=2, logger=False, enable_checkpointing=False,
                        enable_model_summary=False, num_sanity_val_steps=0,
                        callbacks=[LineProgress(every_n_steps=3, stream=out)])  # fmt: skip
    trainer.fit(SequenceTask(net), dm)
    text = out.getvalue()
    assert "\r" not in text and "\x1b" not in text  # no redraws, no cursor escapes
    lines = text.splitlines()
    steps = [ln for ln in lines if " it/s " in ln]
    assert len(steps) == 5  # 16 steps, a line every 3
    assert steps[0].startswith("epoch 0 batch 3/8 step 3 ") and "train/loss=" in steps[0]
    vals = [ln for ln in lines if " val: " in ln]
    assert len(vals) == 2 and "val/loss=" in vals[0] and "val/acc=" in vals[0]


def test_line_progress_total_is_the_epochs_when_max_steps_ends_it():
    """A run whose max_steps ends mid-epoch: every line of that epoch shows the same total,
    the batches it will run (Lightning's own total shrinks with every step)."""
    out = io.StringIO()
    dm = SyntheticDataModule("delayed_recall", distance=3, train_size=64, val_size=16,
                             batch_size=8)  # fmt: skip
    net = SequenceModel("tokens", vocab_size=dm.vocab_size, output_size=dm.num_classes,
                        hidden_size=8, embedding_size=4)  # fmt: skip
    trainer = L.Trainer(max_steps=14, max_epochs=-1, logger=False, enable_checkpointing=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                        callbacks=[LineProgress(every_n_steps=2, stream=out)])  # fmt: skip
    trainer.fit(SequenceTask(net), dm)
    steps = [ln.split()[:4] for ln in out.getvalue().splitlines() if " it/s " in ln]
    assert [s[3] for s in steps] == ["2/8", "4/8", "6/8", "8/8", "2/6", "4/6", "6/6"]


def test_cli_run_into_a_log_file_has_no_carriage_returns(tmp_path, capsys):
    cli = make_cli(["fit", f"--config={EXP / 'synthetic/base.yaml'}",
                    f"--config={EXP / 'synthetic/copy.yaml'}", "--trainer.max_steps=3",
                    "--trainer.enable_model_summary=false", "--data.init_args.train_size=64",
                    "--data.init_args.val_size=16", "--data.init_args.batch_size=8",
                    "--model.init_args.model.init_args.hidden_size=8",
                    f"--trainer.default_root_dir={tmp_path}"])  # fmt: skip
    assert isinstance(cli.trainer.progress_bar_callback, LineProgress)
    captured = capsys.readouterr()
    assert "\r" not in captured.err + captured.out
    assert "step 3 val: " in captured.err  # the final validation, one line


def test_allocator_tuning_only_where_it_is_ours_to_make(monkeypatch):
    import ctypes.util

    from rnndrop.runtime import tune_allocator

    for k in [k for k in __import__("os").environ if k.startswith("MALLOC_")]:
        monkeypatch.delenv(k)
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    glibc = sys.platform == "linux" and ctypes.util.find_library("c") == "libc.so.6"
    assert tune_allocator() is glibc
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")  # the user's own malloc settings win
    assert tune_allocator() is False
    monkeypatch.delenv("MALLOC_ARENA_MAX")
    monkeypatch.setenv("LD_PRELOAD", "libjemalloc.so")
    assert tune_allocator() is False
