"""Calibration (ECE, NLL, Brier) against hand-computed values and torchmetrics, the reliability
diagram, and the Lightning tasks' val/ece, val/nll, val/brier (and *_mc) logs."""

import math

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torchmetrics.functional.classification import multiclass_calibration_error

from rnndrop.analysis import Calibration, SplitCalibration, calibration_metrics
from rnndrop.analysis import reliability_diagram as diagram
from rnndrop.config import RecurrentDropout as RD
from rnndrop.data import LanguageModelDataModule, SyntheticDataModule
from rnndrop.lit import LanguageModelTask, SequenceTask
from rnndrop.models import LanguageModel, SequenceModel

# Four predictions over three classes, scored by hand with two bins, [0, .5) and [.5, 1]:
#   p = (.7, .2, .1),   y = 0: confidence .7, right   -> bin 1
#   p = (.6, .3, .1),   y = 1: confidence .6, wrong   -> bin 1
#   p = (.4, .35, .25), y = 0: confidence .4, right   -> bin 0
#   p = (.2, .3, .5),   y = 2: confidence .5, right   -> bin 1 (bins are closed on the left)
# bin 0: 1 target, accuracy 1, confidence .4: gap .6
# bin 1: 3 targets, accuracy 2/3, confidence (.7 + .6 + .5) / 3 = .6: gap 1/15
# ECE = 1/4 * .6 + 3/4 * 1/15 = .15 + .05 = .2; MCE = .6
# Brier, Σ_c (p_c - [c = y])²: .09 + .04 + .01 = .14; .36 + .49 + .01 = .86;
#   .36 + .1225 + .0625 = .545; .04 + .09 + .25 = .38; mean 1.925 / 4 = .48125
# NLL: -(ln .7 + ln .3 + ln .4 + ln .5) / 4
PROBS = [[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.4, 0.35, 0.25], [0.2, 0.3, 0.5]]
TARGETS = [0, 1, 0, 2]
HAND = {
    "ece": 0.2,
    "mce": 0.6,
    "brier": 0.48125,
    "nll": -(math.log(0.7) + math.log(0.3) + math.log(0.4) + math.log(0.5)) / 4,
    "acc": 0.75,
    "confidence": 0.55,
    "count": 4,
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_scores_match_hand_computed_values(dtype):
    got = calibration_metrics(torch.tensor(PROBS, dtype=dtype), torch.tensor(TARGETS), n_bins=2)
    for key, want in HAND.items():
        assert got[key] == pytest.approx(want, abs=1e-6), key


def test_log_probabilities_give_the_same_scores():
    p = torch.tensor(PROBS, dtype=torch.float64)
    a = calibration_metrics(p, torch.tensor(TARGETS), n_bins=2)
    b = calibration_metrics(p.log(), torch.tensor(TARGETS), n_bins=2, log=True)
    assert a == pytest.approx(b, abs=1e-12)


def test_ignored_targets_are_skipped_and_leading_dims_flattened():
    p = torch.tensor([*PROBS, [1.0, 0.0, 0.0]]).view(1, 5, 3)
    y = torch.tensor([*TARGETS, -100]).view(1, 5)
    got = calibration_metrics(p, y, n_bins=2)
    assert got["count"] == 4
    assert got["ece"] == pytest.approx(HAND["ece"], abs=1e-6)


def test_accumulating_batches_equals_one_call():
    torch.manual_seed(0)
    p = (3 * torch.randn(300, 5)).softmax(-1)
    y = torch.randint(0, 5, (300,))
    m = Calibration(n_bins=10)
    for i in range(0, 300, 70):
        m.update(p[i : i + 70], y[i : i + 70])
    once = calibration_metrics(p, y, n_bins=10)
    assert {k: float(v) for k, v in m.compute().items()} == pytest.approx(once, abs=1e-9)


@pytest.mark.parametrize("n_bins", [1, 10, 15])
def test_ece_and_mce_agree_with_torchmetrics(n_bins):
    torch.manual_seed(1)
    logits = 2.5 * torch.randn(2000, 7)
    logits[:50] = torch.tensor([100.0, 0, 0, 0, 0, 0, 0])  # confidence exactly 1.0
    p, y = logits.softmax(-1), torch.randint(0, 7, (2000,))
    got = calibration_metrics(p, y, n_bins=n_bins)
    for norm, key in (("l1", "ece"), ("max", "mce")):
        ref = multiclass_calibration_error(p, y, 7, n_bins=n_bins, norm=norm)
        assert got[key] == pytest.approx(float(ref), abs=1e-5), (norm, n_bins)


def calibrated_binary(n: int, seed: int = 0):
    """Predictions that are calibrated by construction: class 0 with probability c, and the
    target drawn as class 0 with that same probability."""
    g = torch.Generator().manual_seed(seed)
    c = 0.5 + 0.5 * torch.rand(n, generator=g, dtype=torch.float64)
    y = (torch.rand(n, generator=g, dtype=torch.float64) >= c).long()
    return torch.stack([c, 1 - c], -1), y


def test_a_calibrated_predictor_has_ece_near_zero():
    # With n_b targets in bin b, |acc_b - conf_b| is the deviation of a mean of n_b Bernoullis
    # (variance <= 1/4): E|.| <= sqrt(2/pi) / 2 / sqrt(n_b); weighting by n_b / N and
    # Cauchy-Schwarz over B bins gives E[ECE] <= 0.4 sqrt(B / N). Allow 2.5 times that.
    n, bins = 20_000, 15
    p, y = calibrated_binary(n)
    got = calibration_metrics(p, y, n_bins=bins)
    assert got["ece"] < math.sqrt(bins / n)
    assert got["confidence"] == pytest.approx(got["acc"], abs=3 * 0.5 / math.sqrt(n))
    # Brier of a calibrated binary predictor: E[2 c (1 - c)] for c ~ U(.5, 1) = 1/3
    assert got["brier"] == pytest.approx(1 / 3, abs=0.01)


def test_an_overconfident_predictor_has_larger_ece_and_nll():
    n, bins = 20_000, 15
    p, y = calibrated_binary(n)
    sharp = (2 * p.log()).softmax(-1)  # temperature 1/2: more confident, same argmax
    calm = calibration_metrics(p, y, n_bins=bins)
    over = calibration_metrics(sharp, y, n_bins=bins)
    assert over["acc"] == calm["acc"]
    # E[c' - c] for c' = c² / (c² + (1 - c)²), c ~ U(.5, 1), is about 0.1: far above the
    # calibrated predictor's noise bound
    assert over["ece"] > 3 * math.sqrt(bins / n) > calm["ece"]
    assert over["confidence"] > over["acc"]
    assert over["nll"] > calm["nll"] and over["brier"] > calm["brier"]


def test_reliability_bins_and_diagram():
    import matplotlib.pyplot as plt

    m = Calibration(n_bins=2)
    m.update(torch.tensor(PROBS), torch.tensor(TARGETS))
    rel = m.reliability()
    assert rel.count.tolist() == [1, 3]
    assert rel.accuracy.tolist() == pytest.approx([1.0, 2 / 3])
    assert rel.confidence.tolist() == pytest.approx([0.4, 0.6])
    fig = diagram({"a": m, "b": rel}, title="t")
    assert len(fig.axes) == 2
    plt.close(fig)


def test_split_calibration_logs_per_kind_and_resets():
    sc = SplitCalibration()
    sc.update("val", torch.tensor(PROBS), torch.tensor(TARGETS))
    sc.update("val", torch.tensor(PROBS).log(), torch.tensor(TARGETS), kind="mc", log=True)
    assert sc.figure("val") is not None and sc.figure("test") is None
    logs = sc.epoch_logs("val")
    assert set(logs) == {f"val/{k}{s}" for k in ("ece", "nll", "brier") for s in ("", "_mc")}
    assert float(logs["val/ece"]) == pytest.approx(float(logs["val/ece_mc"]))
    assert sc.epoch_logs("val") == {}  # reset


# ---- the Lightning tasks --------------------------------------------------------------------

QUIET = {"enable_progress_bar": False, "enable_model_summary": False}


def fit(task, dm, root):
    logger = TensorBoardLogger(str(root), name="run", version="", default_hp_metric=False)
    trainer = L.Trainer(max_epochs=1, logger=logger, limit_train_batches=3, limit_val_batches=2,
                        limit_test_batches=2, enable_checkpointing=False,
                        num_sanity_val_steps=0, **QUIET)  # fmt: skip
    trainer.fit(task, dm)
    trainer.test(task, dm)
    ea = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0, "images": 0})
    ea.Reload()
    values = {t: [e.value for e in ea.Scalars(t)] for t in ea.Tags()["scalars"]}
    return values, set(ea.Tags()["images"])


CAL = ("ece", "nll", "brier")


def check_logged(values, images):
    for split in ("val", "test"):
        for name in CAL:
            for suffix in ("", "_mc"):
                tag = f"{split}/{name}{suffix}"
                assert tag in values, (tag, sorted(values))
                assert all(math.isfinite(v) for v in values[tag]), tag
        assert 0 <= values[f"{split}/ece"][-1] <= 1
        assert 0 <= values[f"{split}/brier"][-1] <= 2
    assert "val/reliability" in images, images


def test_language_model_logs_calibration(text_corpus, tmp_path):
    dm = LanguageModelDataModule("folder", data_dir=str(text_corpus), batch_size=4,
                                 eval_batch_size=4, bptt=6)  # fmt: skip
    net = LanguageModel(dm.vocab_size, 8, 12, 1, dropout=RD.variational(0.2))
    values, images = fit(LanguageModelTask(net, lr=0.5, mc_samples=2), dm, tmp_path)
    check_logged(values, images)
    # the LM scores every token: its calibration NLL is its loss
    assert values["val/nll"][-1] == pytest.approx(values["val/loss"][-1], rel=1e-4)
    assert values["val/nll_mc"][-1] == pytest.approx(values["val/loss_mc"][-1], rel=1e-4)
    assert "val/ppl_mc_geo" in values


def test_sequence_task_logs_calibration(tmp_path):
    dm = SyntheticDataModule("delayed_recall", distance=3, task_args={"n_symbols": 4},
                             train_size=24, val_size=16, test_size=16, batch_size=8)  # fmt: skip
    net = SequenceModel("tokens", vocab_size=dm.vocab_size, output_size=dm.output_size,
                        hidden_size=8, dropout=RD.variational(0.2))  # fmt: skip
    values, images = fit(SequenceTask(net, mc_samples=2), dm, tmp_path)
    check_logged(values, images)
    assert "val/acc_mc" in values


def test_reliability_diagrams_can_be_turned_off(tmp_path):
    dm = SyntheticDataModule("delayed_recall", distance=3, task_args={"n_symbols": 4},
                             train_size=24, val_size=16, test_size=16, batch_size=8)  # fmt: skip
    net = SequenceModel("tokens", vocab_size=dm.vocab_size, output_size=dm.output_size,
                        hidden_size=8)  # fmt: skip
    values, images = fit(SequenceTask(net, reliability_diagrams=False), dm, tmp_path)
    assert "val/ece" in values and "val/ece_mc" not in values  # no MC asked for
    assert not images
