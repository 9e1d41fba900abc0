"""The NaN/divergence guard: a finite but exploding loss and an optimiser overflow stop the run
cleanly, and the last good checkpoint only ever holds a state that was seen to be good."""

import warnings

import lightning as L
import pytest
import torch

from rnndrop.data import LanguageModelDataModule
from rnndrop.lit import DivergenceError, LanguageModelTask, NaNGuard, NonFiniteLossError
from rnndrop.models import LanguageModel

QUIET = {"enable_progress_bar": False, "enable_model_summary": False, "logger": False}


def lm_run(corpus, root, lr, guard, max_steps=30, optimizer="adam"):
    L.seed_everything(0)
    dm = LanguageModelDataModule("folder", data_dir=str(corpus), batch_size=4, bptt=6)
    task = LanguageModelTask(LanguageModel(dm.vocab_size, 8, 12, 1), optimizer=optimizer, lr=lr)
    trainer = L.Trainer(max_steps=max_steps, default_root_dir=root, limit_val_batches=0,
                        enable_checkpointing=False, callbacks=[guard], **QUIET)  # fmt: skip
    trainer.fit(task, dm)
    return trainer


def test_a_finite_exploding_loss_stops_and_is_never_called_good(text_corpus, tmp_path):
    guard = NaNGuard(save_every_n_steps=1)
    with pytest.raises(DivergenceError, match=r"diverged: loss .* > 100 x the first loss") as err:
        lm_run(text_corpus, tmp_path, lr=1e30, guard=guard)
    message = str(err.value)
    assert "\n" not in message and "training stopped before the update" in message
    assert isinstance(err.value, NonFiniteLossError)  # callers catching the guard's error
    ckpts = tmp_path / "checkpoints"
    assert not (ckpts / "last_good.ckpt").exists()  # the only state saved gave the huge loss
    assert "no checkpoint saved yet" in message


def test_last_good_holds_weights_that_gave_a_good_loss(text_corpus, tmp_path):
    class BlowUp(L.Callback):  # a sane run whose step 6 update explodes
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if trainer.global_step == 5:
                for g in optimizer.param_groups:
                    g["lr"] = 1e30

    guard = NaNGuard(save_every_n_steps=2)
    L.seed_everything(0)
    dm = LanguageModelDataModule("folder", data_dir=str(text_corpus), batch_size=4, bptt=6)
    task = LanguageModelTask(LanguageModel(dm.vocab_size, 8, 12, 1), optimizer="adam", lr=1e-2)
    trainer = L.Trainer(max_steps=30, default_root_dir=tmp_path, limit_val_batches=0,
                        enable_checkpointing=False, callbacks=[guard, BlowUp()],
                        **QUIET)  # fmt: skip
    with pytest.raises(DivergenceError, match="global step 6"):
        trainer.fit(task, dm)
    # saved at steps 2, 4 (good: losses at steps 3, 5 passed) and 6 (pending: it diverged)
    ckpt = torch.load(tmp_path / "checkpoints" / "last_good.ckpt", weights_only=False)
    assert ckpt["global_step"] == 4
    assert max(v.abs().max() for v in ckpt["state_dict"].values()) < 100
    assert guard.path == tmp_path / "checkpoints" / "last_good.ckpt"


def test_adam_overflow_stops_with_the_same_clean_message(text_corpus, tmp_path):
    with pytest.raises(DivergenceError, match="optimizer overflow") as err:
        lm_run(text_corpus, tmp_path, lr=1e38, guard=NaNGuard())
    assert "\n" not in str(err.value) and "global step 0" in str(err.value)
    assert "without overflow" in str(err.value.__cause__ or err.value.__context__)


def test_overflow_without_a_guard_is_still_a_divergence_error(text_corpus, tmp_path):
    L.seed_everything(0)
    dm = LanguageModelDataModule("folder", data_dir=str(text_corpus), batch_size=4, bptt=6)
    task = LanguageModelTask(LanguageModel(dm.vocab_size, 8, 12, 1), optimizer="adam", lr=1e38)
    trainer = L.Trainer(max_steps=3, default_root_dir=tmp_path, limit_val_batches=0,
                        enable_checkpointing=False, **QUIET)  # fmt: skip
    with pytest.raises(DivergenceError, match="optimizer overflow"):
        trainer.fit(task, dm)


def test_divergence_reference_survives_a_resume():
    guard = NaNGuard()
    guard.first_loss = 9.2
    fresh = NaNGuard()
    fresh.load_state_dict(guard.state_dict())
    assert fresh.threshold == pytest.approx(920.0)
    assert NaNGuard(divergence_factor=None).threshold is None
    with pytest.raises(ValueError, match="divergence_factor"):
        NaNGuard(divergence_factor=0.5)


def test_cli_reports_divergence_in_one_line_and_exits_1(text_corpus, tmp_path, capsys):
    from rnndrop.lit.cli import main

    code = main(["fit", "--model=rnndrop.lit.LanguageModelTask",
                 "--model.init_args.model=rnndrop.models.LanguageModel",
                 "--model.init_args.model.init_args.hidden_size=8",
                 "--model.init_args.model.init_args.embedding_size=8",
                 "--model.init_args.optimizer=adam", "--model.init_args.lr=1e38",
                 "--data=rnndrop.data.LanguageModelDataModule", "--data.init_args.corpus=folder",
                 f"--data.init_args.data_dir={text_corpus}", "--data.init_args.batch_size=4",
                 "--trainer.max_steps=3", "--trainer.enable_progress_bar=false",
                 f"--trainer.default_root_dir={tmp_path}"])  # fmt: skip
    assert code == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("rnndrop: optimizer overflow")


def test_lightning_pytree_warning_filter_is_narrow():
    from lightning.pytorch.utilities.combined_loader import CombinedLoader

    from rnndrop.lit import _quiet_lightning_pytree  # what importing rnndrop.lit runs

    message = "`isinstance(treespec, LeafSpec)` is deprecated, use something else"
    with warnings.catch_warnings(record=True) as seen:
        warnings.resetwarnings()  # pytest's own filters out of the way
        warnings.simplefilter("always")
        _quiet_lightning_pytree()
        CombinedLoader([1, 2])  # Lightning's own use: silenced
        assert not [w for w in seen if "LeafSpec" in str(w.message)]
        warnings.warn_explicit(message, FutureWarning, "user.py", 1, module="user")
    assert [w for w in seen if "LeafSpec" in str(w.message)]  # anyone else's: shown
