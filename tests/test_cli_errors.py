"""One way to fail: every user error of `rnndrop fit` exits 2 with one `error:` line that names
the problem, where it was set (file and key, or option) and the fix; never a traceback, and no
empty run directory left behind."""

from pathlib import Path

import pytest

from rnndrop.lit.cli import main

EXP = Path(__file__).resolve().parents[1] / "experiments"
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def run(argv, capsys) -> str:
    """Run the CLI in-process; assert exit code 2, one error line, no traceback."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    return lines[0]


def yaml_delta(tmp_path, dropout: str) -> Path:
    path = tmp_path / "delta.yaml"
    path.write_text(f"model:\n  init_args:\n    model:\n      init_args:\n"
                    f"        dropout: {dropout}\n")  # fmt: skip
    return path


def test_missing_ptb_directory_names_the_cli_download_option(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RNNDROP_DATA_DIR", str(tmp_path / "nowhere"))
    line = run(["fit", f"--config={EXP / 'ptb/base.yaml'}",
                f"--config={EXP / 'ptb/zaremba_small.yaml'}", *QUIET], capsys)  # fmt: skip
    assert "ptb.train.txt" in line and str(tmp_path / "nowhere") in line
    assert "--data.init_args.download true" in line and "download=True" not in line
    assert "python -m rnndrop.data.download ptb" in line
    assert list(tmp_path.iterdir()) == [], "nothing written"


@pytest.mark.parametrize("how", ["checksum", "content"])
def test_corrupt_mnist_file_leaves_no_empty_run(how, tmp_path, capsys, monkeypatch):
    data = tmp_path / "data" / "mnist"
    data.mkdir(parents=True)
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                 "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):  # fmt: skip
        (data / name).write_bytes(b"not a gzip file")
    if how == "content":  # past the sha256 check: the reader finds the damage
        monkeypatch.setattr("rnndrop.data.modules.fetch", lambda name, d, download=False: data)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    root = tmp_path / "root"
    line = run(["fit", f"--config={EXP / 'synthetic/base.yaml'}",
                f"--config={EXP / 'synthetic/pixel_mnist.yaml'}", *QUIET,
                f"--data.init_args.data_dir={data.parent}",
                f"--trainer.default_root_dir={root}"], capsys)  # fmt: skip
    assert "train-images-idx3-ubyte.gz" in line
    assert ("sha256" in line) if how == "checksum" else ("gzip" in line)
    assert not root.exists(), sorted(root.rglob("*"))  # no empty runs/.../version_0
    assert list(work.iterdir()) == []


def test_negative_max_steps(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = run(["fit", "--trainer.max_steps", "-5"], capsys)
    assert "--trainer.max_steps" in line and "-5" in line and "non-negative" in line
    assert list(tmp_path.iterdir()) == []


def test_unknown_dropout_scheme_in_yaml_lists_the_presets(tmp_path, capsys):
    delta = yaml_delta(tmp_path, "nonexistent_scheme")
    line = run(["fit", f"--config={EXP / 'synthetic/base.yaml'}", f"--config={delta}"], capsys)
    assert str(delta) in line and "dropout" in line and "nonexistent_scheme" in line
    for preset in ("variational", "zoneout", "awd", "naive", "semeniuta", "weight_drop"):
        assert preset in line, line


def test_a_preset_name_is_a_valid_dropout(tmp_path):
    from rnndrop.lit.cli import make_cli

    delta = yaml_delta(tmp_path, "variational")
    cli = make_cli([f"--config={EXP / 'synthetic/base.yaml'}", f"--config={delta}"], run=False)
    assert cli.model.model.dropout.recurrent > 0


def test_bad_rate_in_yaml_names_key_and_file_in_one_line(tmp_path, capsys):
    delta = yaml_delta(tmp_path, "{recurrent: 1.5}")
    line = run(["fit", f"--config={EXP / 'synthetic/base.yaml'}", f"--config={delta}"], capsys)
    assert str(delta) in line and "dropout.recurrent" in line and "1.5" in line
    assert "[0, 1)" in line and "Union" not in line and "Namespace" not in line


@pytest.mark.parametrize(
    "argv, unknown, suggestion",
    [(["--trainer.max_stepz", "3"], "max_stepz", "trainer.max_steps"),
     (["--model.init_args.lrr", "0.1"], "lrr", "'lr'"),
     (["--model.init_args.model.init_args.dropout.recurent=0.3"], "recurent", "'recurrent'")],
)  # fmt: skip
def test_unknown_keys_get_a_did_you_mean(argv, unknown, suggestion, capsys):
    line = run(["fit", *argv], capsys)
    assert unknown in line and "did you mean" in line and suggestion in line, line


def test_an_abbreviated_key_is_not_taken_for_the_full_one(capsys):
    line = run(["fit", "--trainer.max_step", "3"], capsys)  # argparse would read max_steps
    assert "max_step" in line and "did you mean 'trainer.max_steps'" in line


def test_unknown_key_in_yaml_names_the_file(tmp_path, capsys):
    delta = tmp_path / "typo.yaml"
    delta.write_text("trainer:\n  max_epoch: 3\n")
    line = run(["fit", f"--config={delta}"], capsys)
    assert str(delta) in line and "max_epoch" in line and "trainer.max_epochs" in line


@pytest.mark.parametrize("arg", ["--optimizer=torch.optim.SGD", "--lr_scheduler.class_path=x"])
def test_lightning_optimizer_groups_are_rejected_with_the_one_way(arg, capsys):
    line = run(["fit", arg, "--trainer.max_steps=1"], capsys)
    assert line.startswith(f"error: {arg.split('=')[0]}: LightningCLI's ")
    assert "--model.init_args.optimizer" in line


def test_optimizer_group_in_a_yaml_names_the_file(tmp_path, capsys):
    config = tmp_path / "opt.yaml"
    config.write_text("optimizer:\n  class_path: torch.optim.SGD\n  init_args: {lr: 0.1}\n")
    line = run(["fit", f"--config={config}"], capsys)
    assert f"{config}: optimizer: LightningCLI's optimizer group is not supported" in line
