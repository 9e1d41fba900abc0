"""Exact mid-epoch resume of the epoch aggregates: a run stopped at step k and resumed ends the
epoch with the same train/epoch_loss, train/ppl (and acc) as an uninterrupted run."""

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from rnndrop.config import RecurrentDropout as RD
from rnndrop.data import LanguageModelDataModule, SyntheticDataModule
from rnndrop.lit import LanguageModelTask, SequenceTask
from rnndrop.lit.base import SplitMetric
from rnndrop.models import LanguageModel, SequenceModel

QUIET = {"enable_progress_bar": False, "enable_model_summary": False, "logger": False,
         "enable_checkpointing": False, "limit_val_batches": 0}  # fmt: skip


class SaveAt(Callback):
    """Save a checkpoint mid-epoch, where ModelCheckpoint(every_n_train_steps) saves."""

    def __init__(self, step, path):
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)


def epoch_metrics(setup, ckpt=None, save_at=None):
    L.seed_everything(0)
    task, dm = setup()
    trainer = L.Trainer(max_epochs=1, callbacks=[SaveAt(*save_at)] if save_at else [], **QUIET)
    trainer.fit(task, dm, ckpt_path=ckpt)
    return {k: v.clone() for k, v in trainer.callback_metrics.items()}


def lm(corpus):
    dm = LanguageModelDataModule("folder", data_dir=str(corpus), batch_size=4, bptt=7)
    net = LanguageModel(dm.vocab_size, 8, 12, 2, dropout=RD.variational(0.3))
    return LanguageModelTask(net, lr=0.5), dm


def test_lm_epoch_loss_and_ppl_are_exact_after_a_mid_epoch_resume(text_corpus, tmp_path):
    full = epoch_metrics(lambda: lm(text_corpus), save_at=(6, tmp_path / "mid.ckpt"))
    assert set(full) >= {"train/epoch_loss", "train/ppl"}
    resumed = epoch_metrics(lambda: lm(text_corpus), ckpt=tmp_path / "mid.ckpt")
    for k in ("train/epoch_loss", "train/ppl"):
        assert torch.equal(resumed[k], full[k]), (k, resumed[k], full[k])


def test_sequence_epoch_loss_and_accuracy_are_exact_after_a_mid_epoch_resume(tmp_path):
    def setup():
        dm = SyntheticDataModule("delayed_recall", distance=3, train_size=48, val_size=8,
                                 batch_size=8)  # fmt: skip
        net = SequenceModel("tokens", vocab_size=dm.vocab_size, output_size=dm.num_classes,
                            hidden_size=8, embedding_size=4)  # fmt: skip
        return SequenceTask(net), dm

    full = epoch_metrics(setup, save_at=(2, tmp_path / "mid.ckpt"))
    resumed = epoch_metrics(setup, ckpt=tmp_path / "mid.ckpt")
    for k in ("train/epoch_loss", "train/acc"):
        assert torch.equal(resumed[k], full[k]), (k, resumed[k], full[k])


def test_running_means_are_weighted():
    mean = SplitMetric()["train"]
    mean.update(torch.tensor(2.0), 3)  # e.g. a loss over 3 tokens
    mean.update(torch.tensor(4.0), torch.tensor(1))
    assert mean.compute().item() == 2.5
    mean.reset()
    mean.update(torch.tensor(float("nan")), 2)
    assert mean.compute().isnan()  # shown, not silently dropped
