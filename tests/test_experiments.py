"""Every config in experiments/ parses and trains a step through `rnndrop fit` (generated data)."""

from pathlib import Path

import pytest
import torch

from rnndrop.config import RecurrentDropout as RD
from rnndrop.lit.cli import make_cli
from rnndrop.nn import GRU

EXP = Path(__file__).resolve().parents[1] / "experiments"
PTB = ["zaremba_small", "zaremba_medium", "zaremba_large", "gal_medium", "gal_large",
       "gal_medium_tied", "gal_large_tied", "awd", "transformer", "zoneout_char"]  # fmt: skip
SYNTHETIC = ["copy", "delayed_recall", "adding", "pixel_mnist", "selective_copy"]
STUDIES = ["full", "v2", "v3", "context_ptb", "context_ptb_short", "context_ptb_converged"]
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
         "--trainer.fast_dev_run=1", "--trainer.logger=false"]  # fmt: skip


def test_every_config_is_covered():
    found = {p.relative_to(EXP).as_posix() for p in EXP.rglob("*.yaml")}
    covered = {f"ptb/{c}.yaml" for c in PTB} | {f"synthetic/{c}.yaml" for c in SYNTHETIC}
    covered |= {"ptb/base.yaml", "synthetic/base.yaml", "wikitext2/awd.yaml"}
    covered |= {f"long_range/{c}.yaml" for c in STUDIES}
    covered |= {"inference/delayed_recall.yaml"}  # run in tests/test_inference_study.py
    # run in tests/test_study_v3.py
    covered |= {
        f"long_range/tune_{c}.yaml"
        for c in ("selective_copy", "selective_copy_high", "delayed_recall", "delayed_recall_low")
    }
    assert found == covered


def small_lm(corpus):
    return [f"--data.init_args.data_dir={corpus}", "--data.init_args.corpus=folder",
            "--data.init_args.batch_size=4", "--data.init_args.eval_batch_size=4",
            "--data.init_args.bptt=8", "--model.init_args.mc_samples=0"]  # fmt: skip


@pytest.mark.parametrize("name", [*PTB, "wikitext2"])
def test_ptb_configs_run(name, text_corpus, tmp_path):
    configs = [EXP / "ptb/base.yaml"]
    if name == "wikitext2":
        configs += [EXP / "ptb/awd.yaml", EXP / "wikitext2/awd.yaml"]
    elif name.endswith("_tied"):  # a delta on the untied config
        configs += [EXP / f"ptb/{name.removesuffix('_tied')}.yaml", EXP / f"ptb/{name}.yaml"]
    else:
        configs.append(EXP / f"ptb/{name}.yaml")
    args = ["fit", *[f"--config={c}" for c in configs], *QUIET, *small_lm(text_corpus),
            f"--trainer.default_root_dir={tmp_path}"]  # fmt: skip
    if name == "zoneout_char":
        args.append("--data.init_args.tokenization=char")
    cli = make_cli(args)
    assert cli.trainer.global_step == 1
    assert cli.model.model.vocab_size == cli.datamodule.vocab_size  # linked from the data
    if name.endswith("_tied"):  # the delta flips tied and keeps every rate of the base config
        d = cli.model.model.dropout
        assert d.tied and d.recurrent > 0 and d.embedding > 0 and d.output == 0.5


@pytest.mark.parametrize("name", SYNTHETIC)
def test_synthetic_configs_run(name, fake_mnist, tmp_path):
    args = ["fit", f"--config={EXP / 'synthetic/base.yaml'}",
            f"--config={EXP / f'synthetic/{name}.yaml'}", *QUIET,
            f"--trainer.default_root_dir={tmp_path}"]  # fmt: skip
    if name == "pixel_mnist":
        args += [f"--data.init_args.data_dir={fake_mnist}", "--data.init_args.val_size=10",
                 "--data.init_args.batch_size=8"]  # fmt: skip
    else:
        args += ["--data.init_args.train_size=64", "--data.init_args.val_size=32"]
    cli = make_cli(args)
    assert cli.trainer.global_step == 1
    dm, net = cli.datamodule, cli.model.model
    assert net.head.out_features == dm.output_size and cli.model.loss_kind == dm.loss


def test_published_settings_reach_the_model(text_corpus):
    cli = make_cli([f"--config={EXP / 'ptb/base.yaml'}", f"--config={EXP / 'ptb/awd.yaml'}",
                    *small_lm(text_corpus)], run=False)  # fmt: skip
    net = cli.model.model
    first, last = net.encoder.parts
    assert (first.hidden_size, first.num_layers, last.hidden_size) == (1150, 2, 400)
    assert net.decoder.weight is net.embedding.weight  # tied
    assert first.dropout.weight_hh == 0.5 and first.dropout.output == 0.25  # between layers
    assert last.dropout.input == 0 and last.dropout.output == 0.4
    assert cli.model.optim["name"] == "nt_asgd" and cli.datamodule.variable_bptt


def test_default_command_trains_something(tmp_path):
    cli = make_cli(["fit", *QUIET, "--data.init_args.train_size=32",
                    "--data.init_args.val_size=16",
                    f"--trainer.default_root_dir={tmp_path}"])  # fmt: skip
    assert cli.trainer.global_step == 1 and type(cli.model).__name__ == "SequenceTask"


def test_bad_key_and_value_are_named(capsys):
    for arg, names in (
        ("--model.init_args.model.init_args.dropout.recurent=0.3", ["recurent"]),
        ("--model.init_args.model.init_args.dropout.recurrent=1.5", ["recurrent", "1.5"]),
        ("--data.init_args.task=copyy", ["copyy"]),
    ):
        # a bad key fails parsing, a bad rate fails building the config: either way the CLI
        # exits with code 2 and a message naming what is wrong, not a traceback
        with pytest.raises(SystemExit) as info:
            make_cli([arg], run=False)
        text = capsys.readouterr().err
        assert info.value.code == 2 and "Traceback" not in text
        assert all(n in text for n in names), text


@pytest.mark.parametrize("which", ["lm", "synthetic"])
def test_cli_trains_a_gru(which, text_corpus, tmp_path):
    """`--model.init_args.model.init_args.encoder gru`: the model's encoder, from the CLI."""
    if which == "lm":
        base = [f"--config={EXP / 'ptb/base.yaml'}", f"--config={EXP / 'ptb/awd.yaml'}",
                *small_lm(text_corpus), "--model.init_args.model.init_args.hidden_size=8",
                "--model.init_args.model.init_args.embedding_size=4"]  # fmt: skip
    else:
        base = [f"--config={EXP / 'synthetic/base.yaml'}",
                f"--config={EXP / 'synthetic/copy.yaml'}", "--data.init_args.train_size=64",
                "--data.init_args.val_size=32"]  # fmt: skip
    cli = make_cli(["fit", *base, *QUIET, f"--trainer.default_root_dir={tmp_path}",
                    "--model.init_args.model.init_args.encoder=gru"])  # fmt: skip
    net = cli.model.model
    assert cli.trainer.global_step == 1
    assert net.encoder.cell == "gru" and all(isinstance(p, GRU) for p in net.encoder.parts)
    assert cli.model.hparams["model"]["init_args"]["encoder"] == "gru"
    if which == "lm":  # AWD's narrower last layer and the config's rates, on GRUs
        first, last = net.encoder.parts
        assert (first.num_layers, last.hidden_size) == (2, 4) and first.dropout.weight_hh == 0.5
    else:
        assert net.dropout.recurrent == 0.1  # copy.yaml's dropout, unchanged


def test_gru_with_zoneout_cell_is_a_cli_error(capsys):
    with pytest.raises(SystemExit) as info:
        make_cli(["--model.init_args.model.init_args.encoder=gru",
                  '--model.init_args.model.init_args.dropout={"zoneout_cell": 0.3}'],
                 run=False)  # fmt: skip
    err = capsys.readouterr().err
    assert info.value.code == 2 and "zoneout_cell" in err and "GRU" in err, err


def test_gru_with_the_zoneout_preset_is_zoneout_on_h():
    """The preset name is read for the GRU (issue 20): its hidden-state rate, no cell rate."""
    cli = make_cli(["--model.init_args.model.init_args.encoder=gru",
                    "--model.init_args.model.init_args.dropout=zoneout"], run=False)  # fmt: skip
    cfg = cli.model.model.dropout
    assert (cfg.zoneout_hidden, cfg.zoneout_cell) == (0.05, 0.0)


@pytest.mark.parametrize(
    "dropout, want",
    [("variational", RD.variational()),
     ("{preset: variational, p: 0.3}", RD.variational(0.3)),
     ("{preset: awd, wdrop: 0.2, dropoute: 0.0}", RD.awd(dropoute=0.0, wdrop=0.2)),
     ("{recurrent: 0.2, tied: false}", RD(recurrent=0.2, tied=False)),
     ("0.3", RD(between_layers=0.3, time="per_step"))],
)  # fmt: skip
def test_yaml_dropout_forms_reach_the_model(dropout, want, tmp_path):
    """A preset name, a preset with arguments, fields, or a float: as_dropout's forms in YAML."""
    delta = tmp_path / "delta.yaml"
    delta.write_text(f"model:\n  init_args:\n    model:\n      init_args:\n"
                     f"        num_layers: 2\n        dropout: {dropout}\n")  # fmt: skip
    cli = make_cli([f"--config={EXP / 'synthetic/base.yaml'}", f"--config={delta}"], run=False)
    net = cli.model.model
    assert net.dropout == want and net.encoder.parts[0].dropout is net.dropout
    assert cli.model.hparams["model"]["init_args"]["dropout"] == want.to_dict()  # plain data


TINY_STUDY = {"steps": 2, "batch_size": 4, "eval_size": 8, "mc_samples": 1, "val_every": 1}


@pytest.mark.parametrize("which", ["quick", "full", "v2", "v3"])
def test_study_configs_run_a_cell_of_every_encoder(which, tmp_path):
    from rnndrop.study import load_study, run_study
    from rnndrop.study.cli import QUICK

    path = QUICK if which == "quick" else EXP / f"long_range/{which}.yaml"
    study = load_study(path, out_dir=str(tmp_path), **TINY_STUDY)
    assert len(study.cells()) == {"quick": 36, "full": 345, "v2": 2430, "v3": 1400}[which]
    cells = study.cells()
    picks = [
        cells.index(next(c for c in cells if c.scheme == s))
        for s in ("none", "variational", "gru_variational", "gru_zoneout", "transformer_standard",
                  "zoneout_h128")
        if s in study.all_schemes()
    ]  # fmt: skip
    picks += [cells.index(next(c for c in cells if c.task == t)) for t in study.tasks]
    picks = sorted(set(picks))
    results = run_study(study, only=picks, progress=False)
    assert [r["status"] for r in results] == ["ok"] * len(picks)


@pytest.mark.parametrize("name", ["context_ptb", "context_ptb_short", "context_ptb_converged"])
def test_context_study_config_runs(name, tmp_path, text_corpus):
    from rnndrop.study.context import load_context_study, run_context_study

    study = load_context_study(
        EXP / f"long_range/{name}.yaml", corpus="folder", data_dir=str(text_corpus),
        out_dir=str(tmp_path), steps=2, schemes=["variational"], window=12, distances=[1, 5],
        n_targets=8, model={"embedding_size": 8, "hidden_size": 8, "num_layers": 1},
    )  # fmt: skip
    (result,) = run_context_study(study, progress=False)
    assert result["status"] == "ok" and set(result["probe"]["increase"]) == set(study.modes)


@pytest.mark.parametrize("which", ["lm", "synthetic", "synthetic_gru"])
def test_cli_resumes_and_tests_from_a_checkpoint(which, tmp_path, text_corpus):
    """`rnndrop fit --ckpt_path` continues a run; `rnndrop test --ckpt_path` evaluates it.

    LightningCLI parses the checkpoint's hyperparameters back into the model's arguments, so
    they must be in its class_path/init_args form.
    """
    if which == "lm":
        base = [f"--config={EXP / 'ptb/base.yaml'}",
                f"--config={EXP / 'ptb/zaremba_small.yaml'}", *small_lm(text_corpus),
                "--model.init_args.model.init_args.hidden_size=8"]  # fmt: skip
    else:
        base = [f"--config={EXP / 'synthetic/base.yaml'}",
                f"--config={EXP / 'synthetic/delayed_recall.yaml'}",
                "--data.init_args.train_size=64", "--data.init_args.val_size=32",
                "--data.init_args.batch_size=8"]  # fmt: skip
        if which == "synthetic_gru":
            base.append("--model.init_args.model.init_args.encoder=gru")
    quiet = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
             "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=2",
             f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false"]  # fmt: skip
    first = make_cli(["fit", *base, *quiet, "--trainer.max_epochs=1"])
    (ckpt,) = (tmp_path / "checkpoints").glob("best-epoch=0-*.ckpt")
    assert first.trainer.global_step == 3
    hp = torch.load(ckpt, weights_only=False)["hyper_parameters"]["model"]
    assert hp["class_path"].startswith("rnndrop.models.") and "init_args" in hp
    resumed = make_cli(["fit", *base, *quiet, "--trainer.max_epochs=2", f"--ckpt_path={ckpt}"])
    assert resumed.trainer.global_step == 6 and resumed.trainer.current_epoch == 2
    tested = make_cli(["test", *base, *quiet, f"--ckpt_path={ckpt}"])
    assert tested.trainer.state.finished
    assert tested.model.model.encoder.cell == ("gru" if which.endswith("gru") else "lstm")
