"""TensorBoard's HPARAMS tab: data settings and the seed are there, settings the encoder does not
use are not, nothing is None, and no hp/* curve starts with a placeholder."""

import math

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

from rnndrop.config import RecurrentDropout as RD
from rnndrop.data import LanguageModelDataModule
from rnndrop.lit import LanguageModelTask
from rnndrop.models import LanguageModel


def run(corpus, root, encoder):
    L.seed_everything(7)
    dm = LanguageModelDataModule("folder", data_dir=str(corpus), batch_size=4, eval_batch_size=4,
                                 bptt=6)  # fmt: skip
    dropout = RD.variational(0.2) if encoder != "transformer" else None
    net = LanguageModel(dm.vocab_size, 8, 8, 1, encoder=encoder, dropout=dropout)
    logger = TensorBoardLogger(root, name="hp", default_hp_metric=False)
    trainer = L.Trainer(max_epochs=1, logger=logger, limit_train_batches=3, limit_val_batches=2,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)  # fmt: skip
    trainer.fit(LanguageModelTask(net, lr=0.5), dm)
    ea = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0, "tensors": 0})
    ea.Reload()
    content = ea.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    start = HParamsPluginData.FromString(content).session_start_info
    return ea, dict(start.hparams)


def test_lstm_hparams_have_data_and_seed_and_no_transformer_or_none(text_corpus, tmp_path):
    ea, hp = run(text_corpus, tmp_path, "lstm")
    assert hp["data/corpus"].string_value == "folder"
    assert hp["data/bptt"].number_value == 6 and hp["data/batch_size"].number_value == 4
    assert hp["seed"].number_value == 7
    assert hp["model/dropout/recurrent"].number_value == 0.2
    assert not [k for k in hp if "transformer" in k or "num_heads" in k], sorted(hp)
    assert hp["bpc"].bool_value is False  # resolved from the word corpus, not None
    assert not [k for k, v in hp.items() if v.string_value == "None"]
    for tag in ("hp/val_ppl",):
        events = ea.Scalars(tag)
        assert events and all(math.isfinite(e.value) for e in events)  # no NaN placeholder
        assert events[0].step > 0


def test_transformer_hparams_keep_its_settings(text_corpus, tmp_path):
    _, hp = run(text_corpus, tmp_path, "transformer")
    assert "model/num_heads" in hp and any(k.startswith("model/transformer_dropout/") for k in hp)
