"""The long-range study: grid, runner, resume, report, CLI; and the context-usage probe."""

import csv
import json
import math
import re

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from rnndrop.analysis import context_usage, effective_context, mean_ci, solved_distance
from rnndrop.config import PRESETS
from rnndrop.config import RecurrentDropout as RD
from rnndrop.study import (
    BUILTIN_SCHEMES,
    StudyConfig,
    is_finished,
    load_result,
    load_study,
    resolve_scheme,
    run_study,
)
from rnndrop.study import runner as study_runner
from rnndrop.study.cli import main as study_main
from rnndrop.study.report import score


def spec_of(config: RD) -> dict:
    """A dropout config as a cell's spec holds it (later fields at their defaults left out)."""
    from rnndrop.study.config import _hashed

    return _hashed(config.to_dict())


def tiny(tmp_path, **kw) -> StudyConfig:
    base = dict(
        name="t", task="copy", task_args={"n_copy": 2, "n_symbols": 4}, distances=[3, 5],
        seeds=[0], rates=[0.3], schemes=["none", "variational"],
        model={"hidden_size": 8, "embedding_size": 4}, steps=6, batch_size=8, val_every=3,
        eval_size=16, mc_samples=2, out_dir=str(tmp_path),
    )  # fmt: skip
    base.update(kw)
    return StudyConfig(**base)


def _tags(run_dir) -> dict[str, list[str]]:
    ea = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    ea.Reload()
    return ea.Tags()


def test_grid_end_to_end(tmp_path):
    study = tiny(tmp_path)
    assert [str(c) for c in study.cells()] == [
        "none d=3 seed=0", "none d=5 seed=0",
        "variational_p0.3 d=3 seed=0", "variational_p0.3 d=5 seed=0",
    ]  # fmt: skip
    results = run_study(study, progress=False)
    assert len(results) == 4 and all(r["status"] == "ok" for r in results)
    for cell in study.cells():
        d = study.cell_dir(cell)
        assert d == tmp_path / "t" / "copy" / cell.label / f"d={cell.distance}" / "seed=0"
        r = load_result(study, cell)
        assert 0.0 <= r["metrics"]["acc"] <= 1.0 and r["metrics"]["loss"] > 0
        assert 0.0 <= r["metrics"]["mc_tv"] <= 1.0
        assert set(r["grad_through_time"]) == {"input", "state"}
        tags = _tags(d)
        assert {"train/loss", "val/loss", "val/acc"} <= set(tags["scalars"])
        assert "final/grad_through_time_input" in tags["scalars"]
    # the deterministic net has no dropout: MC passes of "none" equal it
    none = load_result(study, study.cells()[0])["metrics"]
    assert none["mc_tv"] == pytest.approx(0.0, abs=1e-6)
    assert none["loss_mc"] == pytest.approx(none["loss"], rel=1e-5)

    from rnndrop.study import write_report

    paths = write_report(study, results)
    rows = list(csv.DictReader(paths["csv"].open()))
    assert len(rows) == 4 and {r["label"] for r in rows} == {"none", "variational_p0.3"}
    for row, r in zip(rows, results, strict=True):
        assert row["config_hash"] == r["config_hash"]
        assert float(row["score"]) == pytest.approx(score(r))
    md = paths["markdown"].read_text()
    assert "| none |" in md and "| variational_p0.3 |" in md and "d=5" in md
    assert "‖∂L_T/∂x_(T-1-k)‖" in md and "‖∂L_T/∂h_(T-1-k)‖" in md  # input and state tables
    for key in ("score_png", "gradient_png"):
        assert paths[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    tags = _tags(study.root / "summary")
    assert {"report/score", "report/gradient"} <= set(tags["images"])


def test_score_is_normalised_accuracy():
    r = {"status": "ok", "metrics": {"acc": 0.55}, "task": {"loss": "cross_entropy",
         "chance": 0.1, "baseline_loss": 1.0}}  # fmt: skip
    assert score(r) == pytest.approx(0.5)
    reg = {"status": "ok", "metrics": {"loss": 0.25}, "task": {"loss": "mse", "chance": None,
           "baseline_loss": 1.0}}  # fmt: skip
    assert score(reg) == pytest.approx(0.75)
    assert math.isnan(score({**r, "status": "diverged: nan"}))


def test_resume_skips_finished_and_reruns_killed_cells(tmp_path, monkeypatch):
    study = tiny(tmp_path, distances=[3])
    first, second = study.cells()
    run_study(study, only=[0], progress=False)
    assert is_finished(study, first) and not is_finished(study, second)
    # a cell killed mid-run leaves its directory and events but no result.json
    killed = study.cell_dir(second)
    killed.mkdir(parents=True)
    (killed / "events.out.tfevents.partial").write_bytes(b"")
    ran = []
    real = study_runner.run_cell
    monkeypatch.setattr(study_runner, "run_cell", lambda s, c, **kw: ran.append(c) or real(s, c))
    results = run_study(study, progress=False)
    assert ran == [second] and len(results) == 2
    events = [p.name for p in killed.glob("events.out.tfevents.*")]
    assert events and "events.out.tfevents.partial" not in events  # the partial run is gone
    ran.clear()
    run_study(study, progress=False)
    assert ran == []  # everything finished: nothing reruns
    # a change that alters a cell's result (the budget) makes finished cells stale
    longer = tiny(tmp_path, distances=[3], steps=7)
    assert not is_finished(longer, first)
    assert longer.cell_hash(first) != study.cell_hash(first)


def test_half_written_result_counts_as_unfinished(tmp_path):
    study = tiny(tmp_path, distances=[3], schemes=["none"])
    (cell,) = study.cells()
    study.cell_dir(cell).mkdir(parents=True)
    (study.cell_dir(cell) / "result.json").write_text('{"config_hash": "')
    assert load_result(study, cell) is None and not is_finished(study, cell)


def test_cli_list_cell_and_report(tmp_path, capsys):
    cfg = tmp_path / "s.yaml"
    cfg.write_text(json.dumps(tiny(tmp_path).to_dict()))  # JSON is YAML
    assert study_main(["long-range", "--config", str(cfg), "--list-cells"]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert len(listing) == 4 and all("todo" in line for line in listing)
    # one array job runs one cell and writes no report
    assert study_main(["long-range", "--config", str(cfg), "--cell", "2", "--no-progress"]) == 0
    study = load_study(cfg)
    assert is_finished(study, study.cells()[2]) and not (study.root / "summary.md").exists()
    # the report over what has finished says what is missing
    assert study_main(["long-range", "--config", str(cfg), "--report-only"]) == 0
    out = capsys.readouterr()
    assert "3 cell(s) not finished" in out.err and "variational_p0.3" in out.out
    assert study_main(["long-range", "--config", str(cfg), "--cell", "9"]) == 2
    assert "cell numbers [9] out of range" in capsys.readouterr().err
    cfg.write_text("steps: -1\n")
    assert study_main(["long-range", "--config", str(cfg)]) == 2
    assert "steps must be >= 1" in capsys.readouterr().err


def test_transformer_scheme_runs_in_a_study(tmp_path):
    study = tiny(tmp_path, distances=[4], schemes=["transformer_attention"],
                 model={"hidden_size": 8, "embedding_size": 8, "num_heads": 2})  # fmt: skip
    (result,) = run_study(study, progress=False)
    assert result["status"] == "ok" and result["spec"]["encoder"] == "transformer"
    assert result["spec"]["model"]["num_layers"] == 2  # the scheme's own model override
    assert result["spec"]["dropout"]["attention"] == 0.3
    assert set(result["grad_through_time"]) == {"input"}  # no recurrent state to probe
    from rnndrop.study import write_report

    md = write_report(study, [result])["markdown"].read_text()
    assert "‖∂L_T/∂x_(T-1-k)‖" in md and "‖∂L_T/∂h_(T-1-k)‖" not in md  # no empty state table


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"schemes": ["nope"]}, "unknown scheme"),
        ({"rates": [1.0]}, "1.0"),
        ({"distances": [0]}, "distances"),
        ({"steps": 0}, "steps"),
        ({"seeds": []}, "seed"),
        ({"custom_schemes": {"x": {"encoder": "mlp"}}, "schemes": ["x"]}, "encoder"),
        (
            {
                "custom_schemes": {"x": {"encoder": "gru", "dropout": {"zoneout_cell": "p"}}},
                "schemes": ["x"],
            },
            r"scheme 'x'.*zoneout_cell.*GRU",
        ),
        ({"custom_schemes": {"x": {"dropout": "variationl"}}, "schemes": ["x"]}, "variationl"),
        (
            {"custom_schemes": {"x": {"dropout": {"preset": "naive", "q": "p"}}}, "schemes": ["x"]},
            "q",
        ),
        ({"model": {"hidden_size": 8, "encoder": "gru"}}, "encoder"),
        ({"custom_schemes": {"x": {"dropot": {}}}, "schemes": ["x"]}, "dropot"),
    ],
)
def test_bad_study_configs_name_the_problem(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        tiny(tmp_path, **kw)


# ---- schemes: one registry (RecurrentDropout's presets), LSTM and GRU ------------------------

AT_RATE = {
    "zoneout": {"hidden": 0.3, "cell": 0.3},
    "none": {},
    "awd": dict.fromkeys(("dropoute", "dropouti", "dropouth", "dropout", "wdrop"), 0.3),
}


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_builtin_schemes_are_the_presets_at_rate_p(preset, cell):
    """A built-in scheme at rate p is RecurrentDropout.<preset> with p for each rate argument,
    field by field; the GRU's zoneout is hidden-only."""
    name = preset if cell == "lstm" else f"gru_{preset}"
    if (cell, preset) == ("gru", "moon"):  # a GRU has no cell state: no such scheme
        assert name not in BUILTIN_SCHEMES
        return
    encoder, got = resolve_scheme(BUILTIN_SCHEMES[name], 0.3)
    want = RD.preset(preset, **AT_RATE.get(preset, {"p": 0.3}))
    if (cell, preset) == ("gru", "zoneout"):
        want = RD.zoneout(hidden=0.3, cell=0.0)
    assert encoder == cell and got == want
    assert got.to_dict() == want.to_dict()


@pytest.mark.parametrize("name", ["variational_untied", "gru_variational_untied"])
def test_untied_variational_scheme(name):
    assert resolve_scheme(BUILTIN_SCHEMES[name], 0.3)[1] == RD.variational(0.3, tied=False)


def test_quick_study_keeps_its_grid_and_published_hashes():
    """The quick study's cells, and their config hashes, are those of the published results:
    deriving the schemes from the presets changed none of them."""
    from pathlib import Path

    from rnndrop.study.cli import QUICK

    docs = Path(__file__).parents[1] / "docs" / "results"
    quick = load_study(QUICK)
    rows = list(csv.DictReader((docs / "quick" / "results.csv").open()))
    assert {f"{r['label']} d={r['distance']} seed={r['seed']}": r["config_hash"] for r in rows} \
        == {str(c): quick.cell_hash(c) for c in quick.cells()}  # fmt: skip
    # the full study's LSTM and transformer cells too, but awd: it gained the embedding site
    full = load_study(Path(__file__).parents[1] / "experiments" / "long_range" / "full.yaml")
    hashes = {str(c): full.cell_hash(c) for c in full.cells()}
    rows = list(csv.DictReader((docs / "full" / "results.csv").open()))
    changed = {
        r["scheme"]
        for r in rows
        if hashes[f"{r['label']} d={r['distance']} seed={r['seed']}"] != r["config_hash"]
    }
    assert changed == {"awd"}  # fmt: skip


def test_scheme_dropout_forms(tmp_path):
    """A scheme's dropout takes what as_dropout takes, with "p" for the swept rate."""
    custom = {
        "name": {"dropout": "variational"},  # a preset at its defaults: runs once
        "half": {"encoder": "gru", "dropout": {"preset": "variational", "p": "p/2"}},
        "float": {"dropout": "p"},  # torch's meaning: per-step, between layers
        "fields": {"dropout": {"recurrent": "p", "tied": False}},
    }
    study = tiny(tmp_path, schemes=list(custom), rates=[0.2, 0.4], custom_schemes=custom)
    assert study.rates_for("name") == [None] and study.rates_for("half") == [0.2, 0.4]
    got = {c.label: study.cell_spec(c) for c in study.cells() if c.distance == 3}
    assert got["name"]["dropout"] == spec_of(RD.variational())
    assert got["half_p0.4"]["dropout"] == spec_of(RD.variational(0.2))
    assert got["half_p0.4"]["encoder"] == "gru"
    assert got["float_p0.2"]["dropout"] == spec_of(RD(between_layers=0.2, time="per_step"))
    assert got["fields_p0.4"]["dropout"] == spec_of(RD(recurrent=0.4, tied=False))


def test_gru_schemes_run_in_a_study(tmp_path):
    study = tiny(tmp_path, distances=[3], schemes=["gru_zoneout", "gru_awd", "variational"])
    assert [c.label for c in study.cells()] == ["gru_zoneout_p0.3", "gru_awd_p0.3",
                                                "variational_p0.3"]  # fmt: skip
    results = run_study(study, progress=False)
    assert [r["status"] for r in results] == ["ok"] * 3
    gru_zoneout, gru_awd, lstm = results
    assert gru_zoneout["spec"]["encoder"] == "gru" and lstm["spec"]["encoder"] == "lstm"
    assert gru_zoneout["spec"]["dropout"] == spec_of(RD.zoneout(0.3, 0.0))
    assert gru_awd["spec"]["dropout"]["weight_hh"] == 0.3
    for r in results:  # the hidden-state gradient for both recurrent cells
        assert set(r["grad_through_time"]) == {"input", "state"}
        assert all(math.isfinite(v) for v in r["grad_through_time"]["state"].values())
    from rnndrop.study import write_report

    paths = write_report(study, results)
    rows = list(csv.DictReader(paths["csv"].open()))
    assert [r["encoder"] for r in rows] == ["gru", "gru", "lstm"]
    md = paths["markdown"].read_text()
    assert "| gru_zoneout_p0.3 |" in md and "GRU/LSTM hidden state, all layers" in md
    md = write_report(study, results[:2])["markdown"].read_text()
    assert "(GRU hidden state, all layers" in md


def test_load_study_rejects_unknown_keys_and_missing_files(tmp_path):
    cfg = tmp_path / "s.yaml"
    cfg.write_text("stepz: 3\n")
    with pytest.raises(ValueError, match="stepz"):
        load_study(cfg)
    with pytest.raises(FileNotFoundError, match="nothere"):
        load_study(tmp_path / "nothere.yaml")


def test_custom_scheme_with_rate_expressions(tmp_path):
    mine = {"dropout": {"recurrent": "p", "output": "p/2", "zoneout_cell": "p*2"}}
    study = tiny(tmp_path, schemes=["mine"], rates=[0.2, 0.4], custom_schemes={"mine": mine})
    cells = study.cells()
    assert [c.rate for c in cells] == [0.2, 0.2, 0.4, 0.4]
    spec = study.cell_spec(cells[2])["dropout"]
    assert spec["recurrent"] == 0.4 and spec["output"] == 0.2 and spec["zoneout_cell"] == 0.8


def test_mean_ci_and_solved_distance():
    xs = [1.0, 2.0, 3.0]
    m, h = mean_ci(xs)
    assert m == 2.0 and h == pytest.approx(4.303 * 1.0 / math.sqrt(3), rel=1e-4)
    assert math.isnan(mean_ci([5.0])[1]) and math.isnan(mean_ci([])[0])
    assert solved_distance({10: 0.99, 30: 0.95, 60: 0.5, 100: 0.97}, 0.9) == 30
    assert solved_distance({10: 0.5}, 0.9) is None


# --- the context-usage probe (Khandelwal et al. 2018) on toy LMs with known answers ---


class LagModel(torch.nn.Module):
    """Predicts the next token from the token ``lag`` positions back: x_{t+1} = x_{t-lag} + 1."""

    def __init__(self, vocab: int, lag: int):
        super().__init__()
        self.vocab, self.lag = vocab, lag
        self.scale = torch.nn.Parameter(torch.tensor(8.0))

    def forward(self, tokens):
        T = tokens.shape[1]
        src = torch.full_like(tokens, -1)
        if self.lag < T:
            src[:, self.lag :] = tokens[:, : T - self.lag]
        target = (src + 1) % self.vocab
        logits = self.scale * torch.nn.functional.one_hot(target.clamp_min(0), self.vocab).float()
        logits[src < 0] = 0.0  # no token that far back: uniform

        class Out:
            pass

        out = Out()
        out.logits = logits
        return out


def periodic_stream(vocab: int, lag: int, n: int) -> torch.Tensor:
    """x_t = x_{t-lag-1} + 1 (mod vocab): LagModel(lag) predicts it perfectly."""
    g = torch.Generator().manual_seed(0)
    s = torch.empty(n, dtype=torch.long)
    s[: lag + 1] = torch.randint(0, vocab, (lag + 1,), generator=g)
    for t in range(lag + 1, n):
        s[t] = (s[t - lag - 1] + 1) % vocab
    return s


@pytest.mark.parametrize("lag", [0, 4])
def test_context_probe_finds_the_context_a_model_uses(lag):
    V = 10
    stream = periodic_stream(V, lag, 3000)
    model = LagModel(V, lag)
    ds = [1, 2, 3, 4, 5, 6, 8, 12]
    res = context_usage(model, stream, ds, window=20, n_targets=400)
    # the target's source token sits lag + 1 tokens before the target
    for mode in ("shuffle", "replace", "cut"):
        inc = res["increase"][mode]
        for d in ds:
            if d >= lag + 1:  # the source is never touched: exactly no change
                assert inc[d] == pytest.approx(0.0, abs=1e-6), (mode, d)
            else:  # the source is perturbed (cut: gone; else wrong with prob ~ 1 - 1/V)
                assert inc[d] > 2.0, (mode, d)
        assert effective_context(inc, threshold=0.01) == (lag + 1 if lag else 1)
    assert res["loss"] < 0.01


def test_context_probe_rejects_bad_arguments():
    stream = periodic_stream(5, 0, 100)
    model = LagModel(5, 0)
    with pytest.raises(ValueError, match="distances"):
        context_usage(model, stream, [0], window=10)
    with pytest.raises(ValueError, match="perturbation"):
        context_usage(model, stream, [1], window=10, modes=["swap"])
    with pytest.raises(ValueError, match="too short"):
        context_usage(model, stream[:8], [1], window=10)


def test_tensorboard_export(tmp_path, capsys):
    from torch.utils.tensorboard import SummaryWriter

    from rnndrop.study.tbexport import find_runs, main, to_table

    for name, values in (("a", [3.0, 1.0, 2.0]), ("b/x", [5.0])):
        w = SummaryWriter(str(tmp_path / "runs" / name))
        for step, v in enumerate(values):
            w.add_scalar("val/loss", v, step)
        w.add_scalar("only_a" if name == "a" else "other", 7.0, 0)
        w.close()
    runs = find_runs([tmp_path / "runs"])
    assert sorted(runs) == ["runs/a", "runs/b/x"]
    header, rows = to_table(runs, ["val/loss"], "min")
    assert header == ["run", "val/loss"] and dict(map(tuple, rows)) == {
        "runs/a": 1.0,
        "runs/b/x": 5.0,
    }
    header, rows = to_table(runs, ["val/loss"], "last")
    assert dict(map(tuple, rows))["runs/a"] == 2.0
    header, rows = to_table(runs, long=True)
    assert len([r for r in rows if r[1] == "val/loss"]) == 4
    header, rows = to_table(runs, stat="mean")
    row_a = dict(zip(header, rows[0], strict=True))
    assert row_a["val/loss"] == pytest.approx(2.0) and math.isnan(row_a["other"])
    out = tmp_path / "t.md"
    assert main([str(tmp_path / "runs"), "--tags", "val/loss", "--out", str(out)]) == 0
    assert "| runs/a | 2 |" in out.read_text()
    assert main([str(tmp_path / "runs"), "--tags", "nope"]) == 2
    assert "nope" in capsys.readouterr().err
    assert main([str(tmp_path / "missing")]) == 2


def test_slurm_array_script_runs_cells_then_report(tmp_path):
    """experiments/long_range/slurm.sh, run as SLURM would: one process per array task."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "experiments" / "long_range" / "slurm.sh"
    study = tiny(tmp_path, schemes=["none"], distances=[3, 4], mc_samples=0)
    cfg = tmp_path / "s.yaml"
    cfg.write_text(json.dumps(study.to_dict()))
    env = {**os.environ, "STUDY_CONFIG": str(cfg), "STUDY_OUT": str(tmp_path / "out"),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # fmt: skip
    for task_id in ("0", "1"):
        subprocess.run(["bash", str(script)], env={**env, "SLURM_ARRAY_TASK_ID": task_id},
                       check=True, capture_output=True)  # fmt: skip
    done = load_study(cfg, out_dir=str(tmp_path / "out"))
    assert all(is_finished(done, c) for c in done.cells())
    report = subprocess.run(["bash", str(script)], env={**env, "REPORT": "1"}, check=True,
                            capture_output=True, text=True)  # fmt: skip
    assert "| none |" in report.stdout and (done.root / "results.csv").is_file()
    no_task = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
    assert no_task.returncode != 0 and "array job" in no_task.stderr


def test_context_study_runs_a_gru_language_model(tmp_path, text_corpus):
    """A GRU scheme in the context study: a GRU LM carries its state, so window > bptt is fine."""
    from rnndrop.study.context import load_context_study, run_context_study

    cfg = tmp_path / "g.yaml"
    cfg.write_text(json.dumps({
        "corpus": "folder", "data_dir": str(text_corpus), "schemes": ["gru_zoneout"],
        "rates": [0.1], "seeds": [0], "steps": 3, "batch_size": 4, "bptt": 6, "window": 12,
        "distances": [1, 3], "n_targets": 10, "out_dir": str(tmp_path),
        "model": {"embedding_size": 8, "hidden_size": 8, "num_layers": 2},
    }))  # fmt: skip
    (result,) = run_context_study(load_context_study(cfg), progress=False)
    assert result["status"] == "ok" and result["spec"]["encoder"] == "gru"
    assert result["spec"]["dropout"] == spec_of(RD.zoneout(0.1, 0.0))


def test_context_study_runs_the_transformer_within_its_training_context(tmp_path, text_corpus):
    from rnndrop.study.context import load_context_study, run_context_study

    base = {"corpus": "folder", "data_dir": str(text_corpus), "schemes": ["transformer_standard"],
            "rates": [0.1], "seeds": [0], "steps": 3, "batch_size": 4, "distances": [1, 3],
            "n_targets": 10, "out_dir": str(tmp_path), "model": {"embedding_size": 8,
            "hidden_size": 8, "num_layers": 1, "num_heads": 2}}  # fmt: skip
    cfg = tmp_path / "t.yaml"
    cfg.write_text(json.dumps({**base, "bptt": 6, "window": 12}))
    with pytest.raises(ValueError, match=r"window=12 > bptt=6.*transformer_standard"):
        load_context_study(cfg)
    cfg.write_text(json.dumps({**base, "bptt": 8, "window": 8}))
    (result,) = run_context_study(load_context_study(cfg), progress=False)
    assert result["status"] == "ok"
    assert {int(d) for d in result["probe"]["increase"]["cut"]} == {1, 3}  # JSON keys


def test_context_study_on_a_text_folder(tmp_path, text_corpus, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({
        "name": "ctx", "corpus": "folder", "data_dir": str(text_corpus),
        "schemes": ["none", "variational"], "rates": [0.2], "seeds": [0],
        "model": {"embedding_size": 8, "hidden_size": 8, "num_layers": 1}, "steps": 5,
        "batch_size": 4, "bptt": 6, "window": 12, "distances": [1, 3, 6], "n_targets": 20,
        "out_dir": str(tmp_path / "runs"),
    }))  # fmt: skip
    assert study_main(["context", "--config", str(cfg), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "| none |" in out and "| variational_p0.2 |" in out
    root = tmp_path / "runs" / "ctx" / "folder"
    rows = list(csv.DictReader((root / "context.csv").open()))
    assert len(rows) == 2 * 3 * 3  # runs x modes x distances
    for row in rows:
        assert math.isfinite(float(row["increase"])) and float(row["loss"]) > 0
    assert (root / "context_usage.png").read_bytes()[:4] == b"\x89PNG"
    tags = _tags(root / "none" / "seed=0")
    assert "final/context_increase_shuffle" in tags["scalars"]
    assert "report/context" in _tags(root / "summary")["images"]
    # finished runs are not rerun
    assert study_main(["context", "--config", str(cfg), "--no-progress"]) == 0
    assert "0 to run" in capsys.readouterr().err
    cfg.write_text(json.dumps({"corpus": "folder"}))
    assert study_main(["context", "--config", str(cfg)]) == 2
    assert "data_dir" in capsys.readouterr().err


def test_parallel_workers_give_the_same_results(tmp_path, capfd, monkeypatch):
    """Cells run in spawned worker processes match the same cells run in-process, and each
    worker shows its run's step bar (on a terminal: off one, plain lines, test_study_v3)."""
    serial = tiny(tmp_path / "a", schemes=["variational"], distances=[3, 4], mc_samples=0)
    parallel = tiny(tmp_path / "b", schemes=["variational"], distances=[3, 4], mc_samples=0)
    one = run_study(serial, progress=False)
    capfd.readouterr()
    monkeypatch.setattr(study_runner, "on_terminal", lambda: True)
    two = run_study(parallel, workers=2, progress=True)
    err = capfd.readouterr().err
    for cell in parallel.cells():  # each worker's per-run bar: "<cell>: 100%|...| 6/6 [...step/s]"
        assert re.search(re.escape(f"{cell}:") + r"[^\n\r]*\d+/\d+ \[[^\]]*step", err), err
    assert [r["config_hash"] for r in one] == [r["config_hash"] for r in two]
    for a, b in zip(one, two, strict=True):
        assert a["metrics"]["loss"] == pytest.approx(b["metrics"]["loss"], rel=1e-5)
