"""Concrete dropout in the Lightning tasks: the regulariser in the loss, the rates kept out of
weight decay, the learned rates in TensorBoard."""

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from rnndrop.config import RecurrentDropout as RD
from rnndrop.data import LanguageModelDataModule, SyntheticDataModule
from rnndrop.lit import LanguageModelTask, SequenceTask
from rnndrop.models import LanguageModel, SequenceModel
from rnndrop.nn import concrete_regularizer

QUIET = {"enable_progress_bar": False, "enable_model_summary": False, "enable_checkpointing": False}


def seq_setup(concrete=True, **task_kw):
    dm = SyntheticDataModule("delayed_recall", 2, {"n_symbols": 4}, train_size=48, val_size=16,
                             test_size=16, batch_size=16)  # fmt: skip
    net = SequenceModel("tokens", vocab_size=dm.vocab_size, output_size=dm.output_size,
                        hidden_size=8, embedding_size=4,
                        dropout=RD.variational(0.3, concrete=concrete))  # fmt: skip
    return SequenceTask(net, baseline_loss=dm.baseline_loss, optimizer="adam", lr=0.01,
                        **task_kw), dm  # fmt: skip


def test_sequence_task_adds_the_regulariser_with_the_training_set_size(tmp_path, monkeypatch):
    L.seed_everything(0)
    task, dm = seq_setup(concrete_length_scale=0.5)
    trainer = L.Trainer(max_steps=1, logger=False, **QUIET)
    trainer.fit(task, dm)  # attaches the trainer and datamodule
    assert task.concrete_dataset_size() == 48  # sequences in the training set
    batch = next(iter(dm.train_dataloader()))
    task.train()
    monkeypatch.setattr(task, "log", lambda *a, **k: None)  # outside the loop: no logging
    monkeypatch.setattr(task, "log_dict", lambda *a, **k: None)
    torch.manual_seed(1)
    total = task.training_step(batch, 0)
    torch.manual_seed(1)  # the same relaxed masks: the task's loss alone
    plain = task._step(batch, "train")
    reg = concrete_regularizer(task.model, 48, 0.5, output_weight=task.model.head.weight)
    assert float(reg) != 0.0
    assert float(total) == pytest.approx(float(plain + reg), rel=1e-6)


def test_rates_are_kept_out_of_weight_decay_and_learned_rates_are_logged(tmp_path):
    L.seed_everything(0)
    task, dm = seq_setup(weight_decay=0.1)
    logger = TensorBoardLogger(tmp_path, name="c", default_hp_metric=False)
    L.Trainer(max_steps=6, logger=logger, log_every_n_steps=1, **QUIET).fit(task, dm)
    groups = task.optimizers().optimizer.param_groups
    logits = {id(p) for n, p in task.named_parameters() if "dropout_logit" in n}
    assert logits and {id(p) for p in groups[1]["params"]} == logits
    assert groups[1]["weight_decay"] == 0.0 and groups[0]["weight_decay"] == 0.1
    assert not logits & {id(p) for p in groups[0]["params"]}
    ea = EventAccumulator(logger.log_dir)
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    rate_tags = {t for t in tags if t.startswith("dropout_rate/")}
    assert rate_tags and "train/concrete_reg" in tags
    # the rates moved: their logits got gradients from the loss through the relaxed masks
    assert any(abs(ea.Scalars(t)[-1].value - 0.3) > 1e-5 for t in rate_tags)


def test_without_concrete_nothing_changes():
    task, dm = seq_setup(concrete=False, weight_decay=0.1)
    L.Trainer(max_steps=1, logger=False, **QUIET).fit(task, dm)
    assert len(task.optimizers().optimizer.param_groups) == 1
    assert task.concrete_loss() is None


def test_language_model_task_counts_training_tokens(text_corpus):
    dm = LanguageModelDataModule("folder", data_dir=str(text_corpus), batch_size=4,
                                 eval_batch_size=4, bptt=6)  # fmt: skip
    net = LanguageModel(dm.vocab_size, 8, 8, 1, dropout=RD.variational(0.2, concrete=True))
    task = LanguageModelTask(net)
    L.Trainer(max_steps=2, logger=False, limit_val_batches=0, **QUIET).fit(task, dm)
    assert task.concrete_dataset_size() == len(dm.corpus["train"])
    assert task._output_weight() is net.decoder.weight
    assert LanguageModelTask(net, concrete_dataset_size=7).concrete_dataset_size() == 7
    with pytest.raises(ValueError, match="concrete_length_scale"):
        LanguageModelTask(net, concrete_length_scale=-1.0)
