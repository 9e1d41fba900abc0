"""Where `rnndrop fit` writes: everything under --trainer.default_root_dir (default runs/),
nothing in the current directory; last.ckpt and the best checkpoint by val/loss; a max_steps
run validates and saves at its last step; mid-epoch checkpoints are one setting."""

from pathlib import Path

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from rnndrop.lit.cli import make_cli

EXP = Path(__file__).resolve().parents[1] / "experiments"


def tiny(*extra: str) -> list[str]:
    # 8 training batches an epoch; max_steps 5 stops mid-epoch
    return ["fit", f"--config={EXP / 'synthetic/base.yaml'}",
            f"--config={EXP / 'synthetic/copy.yaml'}",
            "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
            "--data.init_args.train_size=64", "--data.init_args.val_size=16",
            "--data.init_args.batch_size=8", "--model.init_args.model.init_args.hidden_size=8",
            "--model.init_args.model.init_args.embedding_size=4", *extra]  # fmt: skip


def test_root_dir_holds_every_output_and_max_steps_ends_in_last_ckpt(tmp_path, monkeypatch):
    work, root = tmp_path / "work", tmp_path / "root"
    work.mkdir()
    monkeypatch.chdir(work)
    cli = make_cli(tiny("--trainer.max_steps=5", f"--trainer.default_root_dir={root}"))
    assert cli.trainer.global_step == 5
    assert list(work.iterdir()) == [], sorted(work.rglob("*"))  # nothing in the cwd
    run = root / "copy" / "version_0"
    assert Path(cli.trainer.log_dir) == run
    names = {p.name for p in run.iterdir()}
    assert {"config.yaml", "hparams.yaml", "checkpoints"} <= names, names
    assert any(n.startswith("events.out.tfevents") for n in names)
    ckpts = run / "checkpoints"
    (best,) = ckpts.glob("best-*.ckpt")
    last = ckpts / "last.ckpt"
    assert last.is_file()
    # the final steps of a max_steps run (mid-epoch) are in last.ckpt, after a final validation
    assert torch.load(last, weights_only=False)["global_step"] == 5
    assert best.name == "best-epoch=0-step=5.ckpt"  # the only validation is the final one
    ea = EventAccumulator(str(run), size_guidance={"scalars": 0})
    ea.Reload()
    assert [e.step for e in ea.Scalars("val/loss")] == [4]  # logged at the last step (0-based)
    saved = (run / "config.yaml").read_text()
    assert f"save_dir: {root}" in saved and "every_n_train_steps" in saved


def test_default_root_is_runs_and_mid_epoch_checkpoints_are_one_setting(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = make_cli(tiny("--trainer.max_steps=4", "--checkpoint.every_n_train_steps=2",
                        "--checkpoint.monitor=null", "--checkpoint.save_top_k=-1"))  # fmt: skip
    assert cli.trainer.global_step == 4
    assert [p.name for p in tmp_path.iterdir()] == ["runs"]
    ckpts = tmp_path / "runs" / "copy" / "version_0" / "checkpoints"
    names = {p.name for p in ckpts.glob("*.ckpt")}
    assert {"best-epoch=0-step=2.ckpt", "best-epoch=0-step=4.ckpt", "last.ckpt"} <= names, names


def test_without_a_logger_outputs_still_go_under_the_root(tmp_path, monkeypatch):
    work, root = tmp_path / "work", tmp_path / "root"
    work.mkdir()
    monkeypatch.chdir(work)
    make_cli(tiny("--trainer.max_epochs=1", "--trainer.logger=false",
                  f"--trainer.default_root_dir={root}"))  # fmt: skip
    assert list(work.iterdir()) == []
    assert (root / "checkpoints" / "last.ckpt").is_file() and (root / "config.yaml").is_file()
    assert len(list((root / "checkpoints").glob("best-*.ckpt"))) == 1


def test_checkpointing_off_writes_no_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = make_cli(tiny("--trainer.max_steps=2", "--trainer.enable_checkpointing=false",
                        f"--trainer.default_root_dir={tmp_path / 'root'}"))  # fmt: skip
    assert cli.trainer.checkpoint_callback is None
    assert not list((tmp_path / "root").rglob("best-*.ckpt"))
    assert not (tmp_path / "runs").exists()


def test_test_after_fit_evaluates_the_best_checkpoint_and_says_so(tmp_path, capsys):
    cli = make_cli(tiny("--trainer.max_steps=3", "--test_after_fit=true",
                        f"--trainer.default_root_dir={tmp_path}"))  # fmt: skip
    best = cli.trainer.checkpoint_callback.best_model_path
    assert best and Path(best).name == "best-epoch=0-step=3.ckpt"
    assert f"testing the best checkpoint {best}" in capsys.readouterr().err
    assert cli.trainer.ckpt_path == best  # trainer.test loaded it


def test_figures_are_on_by_default(tmp_path):
    """Mask statistics and the gradient through time, as scalars and a figure, with no
    setting: the plots a researcher opens first."""
    root = tmp_path / "root"
    cli = make_cli(tiny("--trainer.max_steps=5", f"--trainer.default_root_dir={root}",
                        "--model.init_args.model.init_args.dropout=variational"))  # fmt: skip
    ea = EventAccumulator(cli.trainer.log_dir, size_guidance={"scalars": 0, "images": 0})
    ea.Reload()
    scalars, images = ea.Tags()["scalars"], ea.Tags()["images"]
    assert any(t.startswith("masks/") for t in scalars), scalars
    assert any(t.startswith("grad_through_time/k=") for t in scalars), scalars
    assert "grad_through_time" in images
