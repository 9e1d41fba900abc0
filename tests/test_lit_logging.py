"""Lightning logging and options: bpc, the saved config, lr logging, HPARAMS metrics, max-norm
during training, the study's per-cell summary line and the Adam/AdamW choice."""

import math
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData
from torch import nn

from rnndrop.config import RecurrentDropout as RD
from rnndrop.data import LanguageModelDataModule, SyntheticDataModule
from rnndrop.lit import LanguageModelTask, LearningRateLogger, SequenceTask
from rnndrop.lit.cli import make_cli
from rnndrop.models import LanguageModel, SequenceModel
from rnndrop.nn import LSTM

QUIET = {"enable_progress_bar": False, "enable_model_summary": False}
EXP = Path(__file__).resolve().parents[1] / "experiments"
LN2 = math.log(2)


def events(run_dir) -> EventAccumulator:
    ea = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0})
    ea.Reload()
    return ea


def scalars(ea: EventAccumulator, tag: str) -> dict[int, float]:
    return {e.step: e.value for e in ea.Scalars(tag)}


def lm(corpus, tokenization="word", **task_kw):
    dm = LanguageModelDataModule("folder", data_dir=str(corpus), batch_size=4, eval_batch_size=4,
                                 bptt=6, tokenization=tokenization)  # fmt: skip
    net = LanguageModel(dm.vocab_size, 8, 12, 1, dropout=RD.variational(0.2))
    return LanguageModelTask(net, **task_kw), dm


def fit_and_test(task, dm, root, name, epochs=2):
    logger = TensorBoardLogger(root, name=name, default_hp_metric=False)
    trainer = L.Trainer(max_epochs=epochs, logger=logger, log_every_n_steps=1,
                        limit_train_batches=4, limit_val_batches=3, limit_test_batches=3,
                        enable_checkpointing=False, **QUIET)  # fmt: skip
    trainer.fit(task, dm)
    trainer.test(task, dm)
    return logger.log_dir


# ---- 1. bits per character ------------------------------------------------------------------


def test_char_corpus_logs_bpc_equal_to_loss_over_ln2(text_corpus, tmp_path):
    task, dm = lm(text_corpus, tokenization="char", lr=0.5)
    assert dm.corpus.level == "char"
    ea = events(fit_and_test(task, dm, tmp_path, "char"))
    tags = set(ea.Tags()["scalars"])
    assert {"val/bpc", "test/bpc", "train/bpc"} <= tags, tags
    for split in ("val", "test", "train"):
        loss_tag = "train/epoch_loss" if split == "train" else f"{split}/loss"
        bpc, loss = scalars(ea, f"{split}/bpc"), scalars(ea, loss_tag)
        assert bpc and bpc.keys() == loss.keys()
        for step, value in bpc.items():
            assert value == pytest.approx(loss[step] / LN2, rel=1e-5), (split, step)
    assert len(scalars(ea, "val/bpc")) == 2  # one a validation epoch, none from sanity checks
    # bits per character, not nats: a 10-symbol vocabulary is at most ~log2(10) bits untrained
    assert all(0 < v < 2 * math.log2(dm.vocab_size) for v in scalars(ea, "val/bpc").values())


def test_word_corpus_logs_no_bpc_unless_asked(text_corpus, tmp_path):
    task, dm = lm(text_corpus, lr=0.5)
    tags = set(events(fit_and_test(task, dm, tmp_path, "word", epochs=1)).Tags()["scalars"])
    assert "val/ppl" in tags and not any(t.endswith("/bpc") for t in tags)
    task, dm = lm(text_corpus, lr=0.5, bpc=True)  # forced on
    ea = events(fit_and_test(task, dm, tmp_path, "forced", epochs=1))
    (step, bpc), *_ = scalars(ea, "test/bpc").items()
    assert bpc == pytest.approx(scalars(ea, "test/loss")[step] / LN2, rel=1e-5)


# ---- 2./3. the CLI: resolved config beside the run, learning rate logged ---------------------

CLI_LR = 0.0123


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """One `rnndrop fit` step on the synthetic configs, TensorBoard logger into a temp dir."""
    root = tmp_path_factory.mktemp("cli")
    args = ["fit", f"--config={EXP / 'synthetic/base.yaml'}",
            f"--config={EXP / 'synthetic/delayed_recall.yaml'}",
            "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
            "--trainer.max_steps=1", "--trainer.enable_checkpointing=false",
            f"--trainer.default_root_dir={root}",
            f"--trainer.logger.init_args.save_dir={root}",
            "--data.init_args.train_size=16", "--data.init_args.val_size=16",
            "--data.init_args.batch_size=8",
            "--model.init_args.model.init_args.hidden_size=8",
            "--model.init_args.model.init_args.embedding_size=4",
            f"--model.init_args.lr={CLI_LR}"]  # fmt: skip
    cli = make_cli(args)
    assert cli.trainer.global_step == 1
    return cli, root


def test_cli_saves_the_resolved_config_beside_the_run(cli_run):
    cli, root = cli_run
    logger = cli.trainer.logger
    assert isinstance(logger, TensorBoardLogger)
    log_dir = Path(logger.log_dir)
    assert root in log_dir.parents  # not under ./runs
    assert log_dir.parent.name == "delayed_recall"  # the config's logger name
    saved = log_dir / "config.yaml"
    assert saved.is_file(), sorted(p.name for p in log_dir.iterdir())
    config = yaml.safe_load(saved.read_text())
    model = config["model"]
    assert model["class_path"] == "rnndrop.lit.SequenceTask"
    assert model["init_args"]["lr"] == CLI_LR  # the command-line override
    assert model["init_args"]["model"]["init_args"]["hidden_size"] == 8
    dropout = model["init_args"]["model"]["init_args"]["dropout"]["init_args"]
    assert dropout["recurrent"] == 0.2  # from delayed_recall.yaml
    assert config["data"]["init_args"]["distance"] == [5, 10, 20, 40]
    assert config["trainer"]["max_steps"] == 1
    # the event file sits in the same directory
    assert any(p.name.startswith("events.out.tfevents") for p in log_dir.iterdir())


def test_cli_default_callbacks_log_the_learning_rate(cli_run):
    cli, _ = cli_run
    assert any(isinstance(c, LearningRateLogger) for c in cli.trainer.callbacks)
    ea = events(cli.trainer.logger.log_dir)
    lr_tags = [t for t in ea.Tags()["scalars"] if t.startswith("lr")]
    assert lr_tags, ea.Tags()["scalars"]
    for tag in lr_tags:
        values = [e.value for e in ea.Scalars(tag)]
        assert values and all(v == pytest.approx(CLI_LR, rel=1e-6) for v in values), (tag, values)


def test_learning_rate_logger_follows_the_decay_schedule(tmp_path):
    dm = SyntheticDataModule("delayed_recall", distance=3, train_size=16, val_size=8,
                             batch_size=8)  # fmt: skip
    net = SequenceModel("tokens", vocab_size=dm.vocab_size, output_size=dm.output_size,
                        hidden_size=8)  # fmt: skip
    task = SequenceTask(net, optimizer="sgd", lr=0.4, lr_decay=0.5, decay_start=1)
    logger = TensorBoardLogger(tmp_path, name="lr", default_hp_metric=False)
    trainer = L.Trainer(max_epochs=3, logger=logger, log_every_n_steps=1, limit_val_batches=0,
                        enable_checkpointing=False,
                        callbacks=[LearningRateLogger(logging_interval="epoch")],
                        **QUIET)  # fmt: skip
    trainer.fit(task, dm)
    ea = events(logger.log_dir)
    (tag,) = [t for t in ea.Tags()["scalars"] if t.startswith("lr")]
    values = [e.value for e in ea.Scalars(tag)]
    assert values == pytest.approx([0.4, 0.2, 0.1])  # epoch 0 at lr, halved from epoch 1 on


# ---- 4. HPARAMS metrics -------------------------------------------------------------------


def hparams_metric_tags(run_dir) -> set[str]:
    content = events(run_dir).PluginTagToContent("hparams")
    assert "_hparams_/experiment" in content, sorted(content)
    data = HParamsPluginData.FromString(content["_hparams_/experiment"])
    return {m.name.tag for m in data.experiment.metric_infos}


def test_hparams_tab_declares_the_language_model_metrics(text_corpus, tmp_path):
    task, dm = lm(text_corpus, lr=0.5, mc_samples=1)
    run_dir = fit_and_test(task, dm, tmp_path, "lm", epochs=1)
    metrics = hparams_metric_tags(run_dir)
    assert {"hp/val_ppl", "hp/test_ppl", "hp/val_ppl_mc"} <= metrics, metrics
    tags = set(events(run_dir).Tags()["scalars"])
    assert {"hp/val_ppl", "hp/test_ppl"} <= tags  # and the metrics were logged under them


def test_hparams_tab_declares_the_sequence_metrics(tmp_path):
    dm = SyntheticDataModule("delayed_recall", distance=3, train_size=16, val_size=8,
                             test_size=8, batch_size=8)  # fmt: skip
    net = SequenceModel("tokens", vocab_size=dm.vocab_size, output_size=dm.output_size,
                        hidden_size=8)  # fmt: skip
    run_dir = fit_and_test(SequenceTask(net), dm, tmp_path, "seq", epochs=1)
    metrics = hparams_metric_tags(run_dir)
    assert {"hp/val_loss", "hp/val_acc", "hp/test_acc"} <= metrics, metrics


# ---- 5. max-norm during training ------------------------------------------------------------


def unit_norms(module: nn.Module) -> dict[str, torch.Tensor]:
    """Per-unit (row) norms of what max_norm_ constrains: Linear and LSTM weights."""
    norms = {}
    for name, m in module.named_modules():
        if isinstance(m, nn.Linear):
            norms[f"{name}.weight"] = m.weight.detach().norm(dim=1)
        elif isinstance(m, LSTM | nn.LSTM):
            for n, p in m.named_parameters(recurse=False):
                if n.startswith("weight"):
                    norms[f"{name}.{n}"] = p.detach().norm(dim=1)
    return norms


def train_sequence(max_norm):
    L.seed_everything(0)
    dm = SyntheticDataModule("delayed_recall", distance=3, train_size=40, val_size=8,
                             batch_size=8)  # fmt: skip
    net = SequenceModel("tokens", vocab_size=dm.vocab_size, output_size=dm.output_size,
                        hidden_size=8, num_layers=2, dropout=RD.variational(0.2))  # fmt: skip
    task = SequenceTask(net, optimizer="sgd", lr=5.0, max_norm=max_norm)
    emb = net.embed.weight.detach().clone()
    trainer = L.Trainer(max_steps=5, logger=False, enable_checkpointing=False,
                        limit_val_batches=0, **QUIET)  # fmt: skip
    trainer.fit(task, dm)
    assert trainer.global_step == 5
    assert not torch.equal(net.embed.weight, emb)  # it trained
    return net


def test_max_norm_holds_after_training_steps():
    net = train_sequence(max_norm=0.5)
    norms = unit_norms(net)
    assert {"head.weight", "encoder.parts.0.weight_ih_l0", "encoder.parts.0.weight_hh_l1"} <= set(
        norms
    )
    for name, n in norms.items():
        assert (n <= 0.5 + 1e-6).all(), (name, float(n.max()))
    # embedding rows are word vectors, not units: left alone (the default init has norms ~5)
    assert net.embed.weight.detach().norm(dim=1).max() > 0.5


def test_without_max_norm_the_weights_exceed_it():
    norms = unit_norms(train_sequence(max_norm=None))
    assert max(float(n.max()) for n in norms.values()) > 0.5


# ---- 6. the study's per-cell summary line -----------------------------------------------------


def test_study_prints_a_summary_line_per_cell(tmp_path, capsys):
    from rnndrop.study import StudyConfig, run_study
    from rnndrop.study.runner import summary_line

    study = StudyConfig(name="t", task="copy", task_args={"n_copy": 2, "n_symbols": 4},
                        distances=[3, 5], seeds=[0], rates=[0.3],
                        schemes=["none", "variational"],
                        model={"hidden_size": 8, "embedding_size": 4}, steps=3, batch_size=8,
                        val_every=3, eval_size=8, mc_samples=1,
                        out_dir=str(tmp_path))  # fmt: skip
    cells = study.cells()
    pick = next(i for i, c in enumerate(cells) if c.scheme == "variational" and c.distance == 5)
    (result,) = run_study(study, only=[pick], progress=True)
    assert result["status"] == "ok"
    out = capsys.readouterr()
    expected = summary_line(result)
    lines = [ln for ln in (out.out + out.err).splitlines() if ln.startswith("variational")]
    assert expected in lines, (expected, lines)
    assert expected.startswith("variational_p0.3 d=5 seed=0: ")
    assert "acc " in expected and "loss/baseline" in expected
    assert "1 to run" in out.err
    # run again: the cell is finished, nothing runs and no summary line is printed
    run_study(study, only=[pick], progress=True)
    out = capsys.readouterr()
    assert "0 to run" in out.err and expected not in out.out + out.err


# ---- 7. Adam / AdamW ------------------------------------------------------------------------


def _lm_task(**kw):
    return LanguageModelTask(LanguageModel(10, 4, 4, 1), **kw)


def _seq_task(**kw):
    return SequenceTask(SequenceModel("tokens", vocab_size=6, output_size=6, hidden_size=4), **kw)


def _optimizer(task):
    out = task.configure_optimizers()
    return out["optimizer"] if isinstance(out, dict) else out


@pytest.mark.parametrize("make", [_lm_task, _seq_task], ids=["lm", "seq"])
@pytest.mark.parametrize("lr_decay", [1.0, 0.5])
def test_adamw_and_adam_optimizers(make, lr_decay):
    task = make(optimizer="adamw", lr=0.003, weight_decay=0.1, lr_decay=lr_decay)
    opt = _optimizer(task)
    assert type(opt) is torch.optim.AdamW
    (group,) = opt.param_groups
    assert group["weight_decay"] == 0.1 and group.get("initial_lr", group["lr"]) == 0.003
    ids = {id(p) for p in group["params"]}
    assert ids == {id(p) for p in task.parameters()}

    opt = _optimizer(make(optimizer="adam", lr=0.003, weight_decay=0.01, lr_decay=lr_decay))
    assert type(opt) is torch.optim.Adam
    assert opt.param_groups[0]["weight_decay"] == 0.01

    opt = _optimizer(make(optimizer="sgd", lr=0.003, lr_decay=lr_decay))
    assert type(opt) is torch.optim.SGD
