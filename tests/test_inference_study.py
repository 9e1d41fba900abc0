"""The inference study: end to end on a tiny config, model reuse, and its aggregations checked
against mc_aggregate on the same samples."""

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from rnndrop.analysis import mc_aggregate
from rnndrop.config import RecurrentDropout as RD
from rnndrop.data import SyntheticDataModule
from rnndrop.models import SequenceModel
from rnndrop.study.cli import main
from rnndrop.study.inference import (
    METHODS,
    InferenceStudyConfig,
    collect_predictions,
    evaluate_inference,
    learned_rates,
    load_inference_study,
    run_inference_study,
    write_inference_report,
)

CONFIG = Path(__file__).resolve().parents[1] / "experiments/inference/delayed_recall.yaml"

TINY = {
    "name": "tiny",
    "distance": 3,
    "schemes": ["none", "variational"],
    "seeds": [0],
    "model": {"hidden_size": 8, "embedding_size": 4},
    "steps": 4,
    "batch_size": 8,
    "val_every": 2,
    "eval_size": 16,
    "sample_sizes": [1, 2, 4],
    "n_bins": 5,
}


def test_study_runs_end_to_end_and_reuses_its_models(tmp_path, capsys):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    args = ["inference", "--config", str(cfg), "--out-dir", str(tmp_path), "--no-progress"]
    assert main(args) == 0
    root = tmp_path / "tiny" / "delayed_recall"
    md = (root / "inference.md").read_text()
    assert capsys.readouterr().out.strip() == md.strip()  # the report, and only it, on stdout
    for label in ("none", "variational_p0.25"):
        assert f"| {label} |" in md
    for name in ("inference.csv", "convergence.png", "reliability.png"):
        assert (root / name).stat().st_size > 0, name
    assert any((root / "summary").glob("events.out.tfevents.*"))
    result = json.loads((root / "variational_p0.25" / "seed=0" / "result.json").read_text())
    assert result["status"] == "ok" and not result["reused_model"]
    methods = result["evaluation"]["methods"]
    assert set(methods) == set(METHODS)
    for scores in methods.values():
        assert all(math.isfinite(scores[k]) for k in ("acc", "nll", "ece", "brier"))
    # the table shows the saved numbers (one seed: the mean alone)
    row = next(line for line in md.splitlines() if line.startswith("| variational_p0.25 |"))
    assert f"{methods['mc_arithmetic']['nll']:.3f}" in row
    assert set(result["evaluation"]["convergence"]["geometric"]) == {"1", "2", "4"}
    # a run whose training is unchanged reuses the saved model, only the evaluation reruns
    cfg.write_text(yaml.safe_dump({**TINY, "sample_sizes": [1, 3]}))
    assert main(args) == 0
    again = json.loads((root / "variational_p0.25" / "seed=0" / "result.json").read_text())
    assert again["reused_model"] and again["train_hash"] == result["train_hash"]
    assert again["evaluation"]["methods"]["weight_scaling"] == pytest.approx(
        methods["weight_scaling"]
    )
    assert set(again["evaluation"]["convergence"]["arithmetic"]) == {"1", "3"}


def test_the_reported_aggregations_agree_with_mc_aggregate():
    torch.manual_seed(0)
    n, c, s_max = 400, 5, 6
    scaled = 2 * torch.randn(n, c)
    sampled = scaled + torch.randn(s_max, n, c)
    target = torch.randint(0, c, (n,))
    ev = evaluate_inference(scaled, sampled, target, sample_sizes=[1, 2, 3, 6], n_bins=10)

    def nll_acc(logp):
        nll = float(-logp.gather(1, target[:, None]).mean())
        acc = float((logp.argmax(1) == target).double().mean())
        return nll, acc

    want = {"weight_scaling": nll_acc(scaled.log_softmax(-1))}
    for agg in ("arithmetic", "geometric"):
        want[f"mc_{agg}"] = nll_acc(mc_aggregate(sampled, agg, log=True))
    for method, (nll, acc) in want.items():
        assert ev["methods"][method]["nll"] == pytest.approx(nll, rel=1e-5), method
        assert ev["methods"][method]["acc"] == pytest.approx(acc), method
    # the convergence at S: the mean over the S_max // S disjoint groups of S draws
    for agg in ("arithmetic", "geometric"):
        for s in (1, 2, 3, 6):
            groups = [nll_acc(mc_aggregate(sampled[g * s : (g + 1) * s], agg, log=True))[0]
                      for g in range(s_max // s)]  # fmt: skip
            mean, _, count = ev["convergence"][agg][s]["nll"]
            assert count == s_max // s
            assert mean == pytest.approx(sum(groups) / len(groups), rel=1e-5), (agg, s)
    # at S = S_max there is one group: the MC rows
    assert ev["convergence"]["arithmetic"][6]["nll"][0] == pytest.approx(
        ev["methods"]["mc_arithmetic"]["nll"]
    )
    # geometric aggregation of one sample is that sample: S = 1 agrees for both
    one = ev["convergence"]
    assert one["arithmetic"][1]["nll"][0] == pytest.approx(one["geometric"][1]["nll"][0])


def test_collect_predictions_scores_the_memory_targets():
    dm = SyntheticDataModule("delayed_recall", distance=3, task_args={"n_symbols": 4},
                             train_size=8, val_size=8, test_size=8, batch_size=4)  # fmt: skip
    plain = SequenceModel("tokens", vocab_size=4, output_size=4, hidden_size=6)
    scaled, sampled, target = collect_predictions(plain, dm.test_dataloader(), 3, task=dm.task)
    n = 8 * (dm.task.seq_len - 3)
    assert scaled.shape == (n, 4) and sampled.shape == (3, n, 4) and target.shape == (n,)
    assert torch.equal(sampled[0], scaled) and torch.equal(sampled[2], scaled)  # no dropout
    dropped = SequenceModel("tokens", vocab_size=4, output_size=4, hidden_size=6,
                            dropout=RD.variational(0.5))  # fmt: skip
    scaled, sampled, _ = collect_predictions(dropped, dm.test_dataloader(), 2, task=dm.task)
    assert not torch.equal(sampled[0], sampled[1])
    assert dropped.training  # its mode restored


def test_learned_rates_hook():
    assert learned_rates(SequenceModel("tokens", vocab_size=4, output_size=4)) == {}

    class Logits(nn.Module):
        def __init__(self):
            super().__init__()
            self.rate_logit = nn.Parameter(torch.zeros(3))

    assert learned_rates(Logits()) == {"rate_logit": pytest.approx(0.5)}

    class Site(nn.Module):
        def learned_rates(self):
            return {"recurrent": torch.tensor(0.3)}

    outer = nn.Sequential(Site())
    assert learned_rates(outer) == {"0.recurrent": pytest.approx(0.3)}

    # rnndrop's concrete dropout: the layers' own rates, whatever their parametrisation
    concrete = SequenceModel("tokens", vocab_size=4, output_size=4, hidden_size=6,
                             dropout=RD.variational(0.2, concrete=True))  # fmt: skip
    rates = learned_rates(concrete)
    assert rates and all(k.endswith(("/input", "/recurrent", "/output")) for k in rates), rates
    assert all(v == pytest.approx(0.2, abs=1e-4) for v in rates.values()), rates


def test_config_errors_name_the_setting(tmp_path):
    with pytest.raises(ValueError, match="regression"):
        InferenceStudyConfig(task="adding")
    with pytest.raises(ValueError, match="unknown scheme"):
        InferenceStudyConfig(schemes=["nope"])
    with pytest.raises(ValueError, match="sample_sizes"):
        InferenceStudyConfig(sample_sizes=[0, 5])
    bad = tmp_path / "bad.yaml"
    bad.write_text("stepz: 3\n")
    with pytest.raises(ValueError, match="stepz"):
        load_inference_study(bad)
    assert main(["inference", "--config", str(bad)]) == 2


def test_the_experiment_config_loads_and_runs_a_cell(tmp_path):
    study = load_inference_study(CONFIG)
    assert len(study.cells()) == 14 and study.mc_samples == 50
    tiny = load_inference_study(CONFIG, out_dir=str(tmp_path), schemes=["weight_drop"], seeds=[0],
                                steps=2, val_every=2, eval_size=4, sample_sizes=[1, 2])  # fmt: skip
    (result,) = run_inference_study(tiny, progress=False)
    assert result["status"] == "ok" and result["evaluation"]["targets"] == 4 * 50


def test_a_concrete_scheme_reports_its_learned_rates(tmp_path):
    concrete = {"encoder": "lstm", "dropout": {"preset": "variational", "p": "p",
                                               "concrete": True}}  # fmt: skip
    study = InferenceStudyConfig(**{**TINY, "schemes": ["variational_concrete"],
                                    "custom_schemes": {"variational_concrete": concrete},
                                    "out_dir": str(tmp_path)})  # fmt: skip
    (result,) = run_inference_study(study, progress=False)
    rates = result["learned_rates"]
    assert set(rates) == {f"encoder.parts.0/{s}" for s in ("input", "recurrent", "output")}
    assert all(0 < v < 1 for v in rates.values())
    md = write_inference_report(study, [result])["markdown"].read_text()
    assert "| variational_concrete_p0.25 | encoder.parts.0/recurrent |" in md


def test_train_model_customizes_and_reuses(tmp_path):
    """train_model, the study's training as scripts/ensemble_demo.py uses it: ``customize``
    changes the model before training, and a second call loads the saved model."""
    from rnndrop.study.inference import train_model

    study = InferenceStudyConfig(**{**TINY, "schemes": ["variational"]}, out_dir=str(tmp_path))
    (run,) = study.cells()
    seen = []

    def mlp(model):
        seen.append(model)
        classes = model.head.out_features
        model.head = nn.Sequential(nn.Linear(8, 5), nn.Tanh(), nn.Linear(5, classes))

    first = train_model(study, run, customize=mlp)
    assert first.info["status"] == "ok" and not first.reused
    assert seen == [first.model] and isinstance(first.model.head, nn.Sequential)
    assert (study.cell_dir(run) / "model.pt").is_file()
    second = train_model(study, run, customize=mlp)
    assert second.reused and len(seen) == 2
    for a, b in zip(first.model.state_dict().values(), second.model.state_dict().values(),
                    strict=True):  # fmt: skip
        assert torch.equal(a, b)
    x, _ = next(iter(second.data.test_dataloader()))
    assert second.model.eval()(x).prediction.shape[-1] == second.data.output_size
