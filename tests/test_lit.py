"""Lightning tasks: exact resume, the NaN guard, TensorBoard tags, schedules, NT-ASGD, max-norm."""

import math
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from rnndrop.config import RecurrentDropout as RD
from rnndrop.data import LanguageModelDataModule, SyntheticDataModule
from rnndrop.lit import (
    GradientThroughTime,
    LanguageModelTask,
    MaskStatistics,
    NaNGuard,
    NonFiniteLossError,
    SequenceTask,
    max_norm_,
)
from rnndrop.models import LanguageModel, SequenceModel

QUIET = {"enable_progress_bar": False, "enable_model_summary": False}


class Losses(Callback):
    def __init__(self):
        self.values = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.values.append(float(outputs["loss"]))


def lm_setup(corpus, cell="lstm", **task_kw):
    dm = LanguageModelDataModule("folder", data_dir=str(corpus), batch_size=4, eval_batch_size=4,
                                 bptt=6)  # fmt: skip
    zoneout = {"lstm": "zoneout_cell", "gru": "zoneout_hidden"}[cell]  # the loop path, each cell
    net = LanguageModel(dm.vocab_size, 8, 12, 2, encoder=cell,
                        dropout=RD.variational(0.3).replace(**{zoneout: 0.1}))  # fmt: skip
    return LanguageModelTask(net, **task_kw), dm


def loss_curve(setup, max_steps, ckpt=None, save=None):
    """Training losses of a seeded run of ``setup() -> (task, dm)``, optionally resumed from
    ``ckpt`` and saved to ``save`` at the end."""
    L.seed_everything(0)
    task, dm = setup()
    losses = Losses()
    trainer = L.Trainer(max_steps=max_steps, logger=False, enable_checkpointing=False,
                        limit_val_batches=0, callbacks=[losses], **QUIET)  # fmt: skip
    trainer.fit(task, dm, ckpt_path=ckpt)
    if save:
        trainer.save_checkpoint(save)
    return losses.values


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_lm_resume_mid_epoch_gives_the_same_loss_curve(text_corpus, tmp_path, cell):
    """TBPTT state ((h, c) for the LSTM, h for the GRU) is carried, detached and checkpointed."""

    def run(max_steps, ckpt=None, save=None):
        return loss_curve(lambda: lm_setup(text_corpus, cell, lr=0.5), max_steps, ckpt, save)

    full = run(12)
    first = run(5, save=tmp_path / "mid.ckpt")
    rest = run(12, ckpt=tmp_path / "mid.ckpt")
    assert len(full) == 12 and len(first) == 5 and len(rest) == 7
    assert first + rest == full  # bit for bit: masks (RNG), state, data position restored


def test_synthetic_resume_mid_epoch_gives_the_same_loss_curve(tmp_path):
    """Shuffled synthetic data: the resumed run continues the epoch's order where it stopped."""

    def setup():
        dm = SyntheticDataModule("delayed_recall", distance=3, train_size=24, val_size=8,
                                 batch_size=8)  # fmt: skip
        net = SequenceModel("tokens", vocab_size=dm.vocab_size, output_size=dm.num_classes,
                            hidden_size=8, dropout=RD.variational(0.3))  # fmt: skip
        return SequenceTask(net, lr=0.05), dm

    def run(max_steps, ckpt=None, save=None):
        return loss_curve(setup, max_steps, ckpt, save)

    full = run(8)  # 3 batches an epoch: the cut at 4 is inside epoch 1
    first = run(4, save=tmp_path / "mid.ckpt")
    rest = run(8, ckpt=tmp_path / "mid.ckpt")
    assert len(full) == 8 and len(first) == 4 and len(rest) == 4
    assert first + rest == full


def test_nan_guard_stops_before_the_update_and_keeps_a_good_checkpoint(tmp_path):
    class Poison(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 3:
                with torch.no_grad():
                    pl_module.model.head.bias.fill_(float("nan"))

    dm = SyntheticDataModule("adding", distance=10, train_size=64, val_size=16, batch_size=8)
    net = SequenceModel("float", input_size=2, output_size=1, target="last", hidden_size=8)
    task = SequenceTask(net, loss="mse", baseline_loss=dm.baseline_loss)
    trainer = L.Trainer(max_epochs=3, default_root_dir=tmp_path, logger=False,
                        callbacks=[NaNGuard(save_every_n_steps=1), Poison()], **QUIET)  # fmt: skip
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss .* global step 3") as err:
        trainer.fit(task, dm)
    assert "last good checkpoint" in str(err.value) and "gradient_clip_val" in str(err.value)
    ckpt = torch.load(tmp_path / "checkpoints" / "last_good.ckpt", weights_only=False)
    # the state saved after step 3 gave the NaN loss: a state is good only once a loss
    # computed with it passed, so the last good one is step 2's
    assert ckpt["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())


def test_nan_guard_never_keeps_weights_poisoned_by_a_gradient(tmp_path):
    class PoisonGrad(Callback):  # finite loss, NaN gradient: only the weights show it
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if trainer.global_step == 2:
                pl_module.model.head.bias.grad.fill_(float("nan"))

    dm = SyntheticDataModule("adding", distance=10, train_size=64, val_size=16, batch_size=8)
    net = SequenceModel("float", input_size=2, output_size=1, target="last", hidden_size=8)
    task = SequenceTask(net, loss="mse", baseline_loss=dm.baseline_loss, optimizer="sgd")
    guard = NaNGuard(save_every_n_steps=1)
    trainer = L.Trainer(max_epochs=3, default_root_dir=tmp_path, logger=False,
                        callbacks=[guard, PoisonGrad()], **QUIET)  # fmt: skip
    with pytest.raises(NonFiniteLossError, match=r"non-finite weights in model\.head\.bias"):
        trainer.fit(task, dm)
    ckpt = torch.load(tmp_path / "checkpoints" / "last_good.ckpt", weights_only=False)
    assert ckpt["global_step"] == 2  # saved before the poisoned step, not overwritten
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())


def tags(run_dir):
    ea = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0})
    ea.Reload()
    return ea.Tags()


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_tensorboard_tags_language_model(text_corpus, tmp_path, cell):
    task, dm = lm_setup(text_corpus, cell, lr=0.5, mc_samples=2)
    logger = TensorBoardLogger(tmp_path, name="lm", default_hp_metric=False)
    callbacks = [MaskStatistics(every_n_steps=2), GradientThroughTime(distances=[1, 3, 5])]
    trainer = L.Trainer(max_epochs=2, logger=logger, log_every_n_steps=1, callbacks=callbacks,
                        limit_train_batches=6, **QUIET)  # fmt: skip
    trainer.fit(task, dm)
    trainer.test(task, dm)
    t = tags(logger.log_dir)
    scalars = set(t["scalars"])
    for tag in ["train/loss", "train/epoch_loss", "train/ppl", "val/loss", "val/ppl", "val/ppl_mc",
                "val/entropy_mc", "hp/val_ppl", "hp/val_ppl_mc", "test/ppl", "hp/test_ppl",
                "grad_through_time/k=1", "grad_through_time/k=5"]:  # fmt: skip
        assert tag in scalars, tag
    masks = {s for s in scalars if s.startswith("masks/")}
    assert any(s.endswith("/recurrent/l0") for s in masks)
    zoneout = {"lstm": "zoneout_cell", "gru": "zoneout_hidden"}[cell]
    assert any(s.endswith(f"/{zoneout}/l1") for s in masks)
    assert "grad_through_time" in t["images"]
    ea = EventAccumulator(str(logger.log_dir))
    ea.Reload()
    assert "_hparams_/session_start_info" in ea.PluginTagToContent("hparams")  # HPARAMS tab
    rate = ea.Scalars(next(s for s in masks if s.endswith("/recurrent/l0")))[0].value
    assert abs(rate - 0.3) < 5 * math.sqrt(0.3 * 0.7 / (4 * 12))  # the configured rate


def test_gru_lm_task_trains_and_its_loss_decreases(tmp_path):
    """A GRU language model through the Lightning task: TBPTT on a generated, learnable corpus
    (a fixed cycle of words: each word determines the next)."""
    for split, lines in (("train", 60), ("valid", 5), ("test", 5)):
        (tmp_path / f"{split}.txt").write_text("a c e g b d f h\n" * lines)
    L.seed_everything(0)
    dm = LanguageModelDataModule("folder", data_dir=str(tmp_path), batch_size=4, bptt=8)
    net = LanguageModel(dm.vocab_size, 8, 16, 2, encoder="gru", dropout="variational")
    task = LanguageModelTask(net, optimizer="adam", lr=0.01)
    losses = Losses()
    trainer = L.Trainer(max_steps=30, logger=False, enable_checkpointing=False,
                        limit_val_batches=0, callbacks=[losses], **QUIET)  # fmt: skip
    trainer.fit(task, dm)
    state = task.state["train"]  # the GRU's h, carried from chunk to chunk, detached
    assert isinstance(state, torch.Tensor) and state.shape == (2, 4, 16)
    assert state.grad_fn is None and not state.requires_grad
    first, last = losses.values[:5], losses.values[-5:]
    assert sum(last) < 0.8 * sum(first), losses.values


def test_tensorboard_tags_sequence_task_and_accuracy_by_distance(tmp_path):
    dm = SyntheticDataModule("delayed_recall", distance=[2, 4], train_size=64, val_size=64,
                             batch_size=16)  # fmt: skip
    net = SequenceModel("tokens", vocab_size=dm.vocab_size, output_size=dm.output_size,
                        hidden_size=16)  # fmt: skip
    task = SequenceTask(net, baseline_loss=dm.baseline_loss)
    logger = TensorBoardLogger(tmp_path, name="seq", default_hp_metric=False)
    L.Trainer(max_epochs=1, logger=logger, log_every_n_steps=1, **QUIET).fit(task, dm)
    scalars = set(tags(logger.log_dir)["scalars"])
    for tag in ["train/loss", "val/loss", "val/acc", "val/acc@d=2", "val/acc@d=4",
                "val/baseline_loss", "val/loss_vs_baseline", "hp/val_acc"]:  # fmt: skip
        assert tag in scalars, tag


def test_accuracy_counts_only_memory_positions_on_copy():
    dm = SyntheticDataModule("copy", distance=5, train_size=8, val_size=8, batch_size=8)
    net = SequenceModel("tokens", vocab_size=dm.vocab_size, output_size=dm.output_size)
    task = SequenceTask(net, baseline_loss=dm.baseline_loss)
    task._trainer = SimpleNamespace(datamodule=dm)  # no fit needed to read the task's mask
    x, y = next(iter(dm.val_dataloader()))

    class Oracle(torch.nn.Module):  # right on every blank, wrong on every recalled symbol
        def forward(self, x):
            pred = torch.zeros(*y.shape, dm.output_size)
            pred[..., 0] = 1.0
            return SimpleNamespace(prediction=pred)

    task.model = Oracle()
    task._step((x, y), "val")
    assert task.acc_avg["val"].compute().item() == 0.0  # blanks are not counted


def test_zaremba_learning_rate_schedule():
    task = LanguageModelTask(LanguageModel(10, 4, 4, 1), lr=1.0, lr_decay=0.5, decay_start=4)
    sched = task.configure_optimizers()["lr_scheduler"]["scheduler"]
    seen = []
    for _ in range(7):
        seen.append(sched.get_last_lr()[0])
        sched.optimizer.step()
        sched.step()
    assert seen == [1.0, 1.0, 1.0, 1.0, 0.5, 0.25, 0.125]  # halved each epoch after the 4th


def test_mask_statistics_cover_embedding_and_transformer_sites(text_corpus, tmp_path):
    from rnndrop.config import TransformerDropout

    dm = LanguageModelDataModule("folder", data_dir=str(text_corpus), batch_size=8, bptt=16)
    net = LanguageModel(dm.vocab_size, 32, 32, 2, encoder="transformer", ffn_size=256,
                        dropout=RD(embedding=0.3),
                        transformer_dropout=TransformerDropout(embedding=0.2, residual=0.2,
                                                               ffn=0.4, drop_path=0.5))  # fmt: skip
    logger = TensorBoardLogger(tmp_path, name="tf", default_hp_metric=False)
    trainer = L.Trainer(max_steps=2, logger=logger, log_every_n_steps=1, limit_val_batches=0,
                        callbacks=[MaskStatistics(every_n_steps=1)], **QUIET)  # fmt: skip
    trainer.fit(LanguageModelTask(net, lr=0.5), dm)
    ea = EventAccumulator(str(logger.log_dir))
    ea.Reload()
    rates = {t: ea.Scalars(t)[-1].value for t in ea.Tags()["scalars"] if t.startswith("masks/")}
    sites = {t.rsplit("/", 1)[-1] for t in rates}
    assert {"embedding", "residual_attn", "residual_ffn", "ffn", "drop_path_ffn"} <= sites
    # ffn: 8 x 16 x 256 units per block, drop rate 0.4 within 5 binomial standard errors
    (ffn,) = [v for t, v in rates.items() if t.endswith("blocks.1/ffn")]
    assert abs(ffn - 0.4) < 5 * (0.4 * 0.6 / (8 * 16 * 256)) ** 0.5
    assert all(0.0 <= v <= 1.0 for v in rates.values())
    assert not any(getattr(m, "record_masks", False) for m in net.modules())  # switched off


def test_nt_asgd_triggers_and_averages_iterates():
    task = LanguageModelTask(LanguageModel(10, 4, 4, 1), optimizer="nt_asgd", nonmono=2)
    task._trainer = SimpleNamespace(sanity_checking=False)
    # awd-lstm-lm: trigger when loss > min(previous[:-nonmono])
    for loss in (5.0, 4.0, 3.0, 3.5, 3.6):
        task.note_validation(loss)
        assert task.averaged is None  # 3.5 > min(5)? no; 3.6 > min(5, 4)? no
    task.note_validation(3.2)  # 3.2 > min(5, 4, 3): trigger
    assert task.averaged is not None and task.val_history[-1] == 3.2
    w = task.model.decoder.bias
    iterates = [w.detach().clone()]
    for step in range(3):
        with torch.no_grad():
            w.add_(step + 1.0)
        iterates.append(w.detach().clone())
        task.on_train_batch_end(None, None, step)
    mean = torch.stack(iterates).mean(0)
    torch.testing.assert_close(task.averaged["model.decoder.bias"], mean)
    last = w.detach().clone()
    task.on_validation_epoch_start()  # evaluate with the average...
    torch.testing.assert_close(w, mean)
    task._swap_out_average()  # ...then go back to the iterate
    torch.testing.assert_close(w, last)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_max_norm_constrains_unit_weights_not_embeddings(cell):
    net = LanguageModel(50, 8, 16, 2, encoder=cell)
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(100)
    emb = net.embedding.weight.detach().clone()
    max_norm_(net, 1.5)
    rnn = net.encoder.parts[0]
    for w in (rnn.weight_ih_l0, rnn.weight_hh_l1, net.decoder.weight):
        assert (w.norm(dim=1) <= 1.5 + 1e-5).all()
    assert torch.equal(net.embedding.weight, emb)


def test_max_norm_covers_every_recurrent_layer_and_cell():
    from rnndrop.nn import GRU, GRUCell, LSTMCell

    net = torch.nn.ModuleList([GRU(3, 5), GRUCell(3, 5), LSTMCell(3, 5), torch.nn.GRUCell(3, 5),
                               torch.nn.LSTM(3, 5)])  # fmt: skip
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(1.0)
    max_norm_(net, 0.5)
    for name, p in net.named_parameters():
        norms = p.norm(dim=-1) if "weight" in name else None
        assert norms is None or (norms <= 0.5 + 1e-6).all(), name
        assert "weight" in name or (p == 1.0).all(), name  # biases are not units' weights


@pytest.mark.parametrize("bad", [{"optimizer": "rmsprop"}, {"lr": 0.0}, {"lr_decay": 1.5},
                                 {"loss_reduction": "sum"}, {"mc_samples": -1}])  # fmt: skip
def test_task_argument_errors(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        LanguageModelTask(LanguageModel(10, 4, 4, 1), **bad)
