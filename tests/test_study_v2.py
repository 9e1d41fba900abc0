"""The long-range study v2: several tasks in one study, model variants, paired comparisons
against no dropout, budget-free measures, the verdict, and clean interruption."""

import csv
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from rnndrop.analysis import t_quantile
from rnndrop.data import SyntheticDataModule
from rnndrop.models import SequenceModel
from rnndrop.study import (
    BUILTIN_SCHEMES,
    StudyConfig,
    curve_measures,
    is_finished,
    load_result,
    load_study,
    paired_differences,
    resolve_scheme,
    run_study,
    verdict,
    write_reports,
)

TASKS = {
    "copy": {"task_args": {"n_copy": 2, "n_symbols": 4}, "distances": [3, 5]},
    "adding": {"distances": [4]},
}


def tiny(tmp_path, **kw) -> StudyConfig:
    base = dict(
        name="v2", tasks=TASKS, seeds=[0, 1], rates=[0.3], schemes=["none", "variational"],
        model={"hidden_size": 8, "embedding_size": 4}, steps=6, batch_size=8, val_every=2,
        eval_size=16, mc_samples=0, out_dir=str(tmp_path),
    )  # fmt: skip
    base.update(kw)
    return StudyConfig(**base)


# --- the grid ---------------------------------------------------------------------------------


def test_several_tasks_each_with_its_own_distances(tmp_path):
    study = tiny(tmp_path)
    cells = study.cells()
    assert {(c.task, c.distance) for c in cells} == {("copy", 3), ("copy", 5), ("adding", 4)}
    assert len(cells) == (2 + 1) * 2 * 2  # (copy d + adding d) x schemes x seeds
    c = next(c for c in cells if c.task == "adding")
    assert study.cell_dir(c) == tmp_path / "v2" / "adding" / c.label / "d=4" / f"seed={c.seed}"
    assert study.cell_spec(c)["task"] == "adding" and study.cell_spec(c)["task_args"] == {}
    assert str(c).startswith("adding ")
    # the same cell of a one-task study has the same spec: published hashes stay valid
    one = StudyConfig(**{**tiny(tmp_path).to_dict(), "tasks": {}, "task": "adding",
                         "distances": [4]})  # fmt: skip
    same = next(x for x in one.cells() if (x.scheme, x.seed) == (c.scheme, c.seed))
    assert one.cell_hash(same) == study.cell_hash(c)


def test_task_settings_errors(tmp_path):
    with pytest.raises(ValueError, match="under tasks"):
        path = tmp_path / "s.yaml"
        path.write_text(yaml.safe_dump({"tasks": TASKS, "distances": [1, 2]}))
        load_study(path)
    with pytest.raises(ValueError, match=r"tasks\.copy"):
        tiny(tmp_path, tasks={"copy": {"distance": [3]}})
    with pytest.raises(ValueError, match="distances"):
        tiny(tmp_path, tasks={"copy": {"distances": [0]}})
    with pytest.raises(ValueError, match="not in this study"):
        tiny(tmp_path).for_task("delayed_recall")


def test_variants_add_schemes_on_another_model_paired_with_their_own_baseline(tmp_path):
    study = tiny(
        tmp_path,
        schemes=["none", "variational", "zoneout"],
        variants={"h16": {"model": {"hidden_size": 16}, "schemes": ["none", "zoneout"]}},
    )
    assert study.all_schemes() == ["none", "variational", "zoneout", "none_h16", "zoneout_h16"]
    assert study.model_for("zoneout_h16")["hidden_size"] == 16
    assert study.baseline("zoneout_h16") == "none_h16"
    assert study.baseline("variational") == "none"
    assert study.baseline("none") is None and study.baseline("none_h16") is None
    no_base = tiny(tmp_path, variants={"h16": {"model": {"hidden_size": 16},
                                               "schemes": ["variational"]}})  # fmt: skip
    assert no_base.baseline("variational_h16") is None
    with pytest.raises(ValueError, match="unknown scheme"):
        tiny(tmp_path, variants={"h16": {"model": {}, "schemes": ["nope"]}})
    with pytest.raises(ValueError, match="belong to a scheme"):
        tiny(tmp_path, variants={"h16": {"model": {"dropout": 0.1}, "schemes": ["none"]}})


@pytest.mark.parametrize("encoder", ["lstm", "gru"])
def test_a_seed_fixes_initial_weights_and_data_order_whatever_the_scheme(encoder):
    """What makes the comparison paired: dropout changes neither the initial weights nor the
    data a seed sees, whatever random numbers the scheme draws."""
    prefix = "" if encoder == "lstm" else "gru_"
    schemes = [s for s in BUILTIN_SCHEMES if s.startswith(prefix) and "transformer" not in s]
    schemes = [s for s in schemes if encoder == "gru" or not s.startswith("gru_")]
    states, batches = [], []
    for i, scheme in enumerate(schemes):
        L.seed_everything(3, verbose=False)
        enc, dropout = resolve_scheme(BUILTIN_SCHEMES[scheme], 0.3)
        model = SequenceModel(
            "tokens", vocab_size=6, output_size=5, target="per_step", encoder=enc,
            dropout=dropout, hidden_size=8, embedding_size=4,
        )  # fmt: skip
        states.append(model.state_dict())
        torch.rand(17 * (i + 1))  # a scheme drawing masks moves the global generator
        dm = SyntheticDataModule("copy", 3, {"n_copy": 2, "n_symbols": 4}, train_size=64,
                                 val_size=8, test_size=8, batch_size=8, seed=3)  # fmt: skip
        dm.setup("fit")
        batches.append(next(iter(dm.train_dataloader()))[0])
    for state, batch in zip(states[1:], batches[1:], strict=True):
        assert state.keys() == states[0].keys()
        assert all(torch.equal(state[k], states[0][k]) for k in state)
        assert torch.equal(batch, batches[0])


# --- budget-free measures and the paired statistics -------------------------------------------


def _result(task, curve, *, seed=0, scheme="none", rate=None, distance=5, final_acc=None):
    classification = task == "cls"
    info = (
        {"loss": "cross_entropy", "chance": 0.25, "baseline_loss": math.log(4)}
        if classification
        else {"loss": "mse", "chance": None, "baseline_loss": 1 / 6}
    )
    last = curve[-1]
    metrics = {"acc": final_acc if final_acc is not None else last.get("acc"),
               "loss": last["loss"]} if classification else {"loss": last["loss"]}  # fmt: skip
    label = scheme if rate is None else f"{scheme}_p{rate:g}"
    return {"cell": {"scheme": scheme, "rate": rate, "distance": distance, "seed": seed,
                     "label": label, "task": None},
            "status": "ok", "task": info, "metrics": metrics, "curve": curve}  # fmt: skip


def test_curve_measures_by_hand():
    # accuracy 0.25 is chance (score 0), 1.0 perfect; validations every 100 of 400 steps
    curve = [{"step": s, "loss": 1.0, "acc": a} for s, a in
             [(100, 0.25), (200, 0.625), (300, 0.925), (400, 1.0)]]  # fmt: skip
    m = curve_measures(_result("cls", curve), threshold=0.9, steps=400)
    assert m["auc"] == pytest.approx((0.0 + 0.5 + 0.9 + 1.0) * 100 / 400)
    assert m["steps_to_solve"] == 300
    never = [{"step": s, "loss": 1.0, "acc": 0.5} for s in (100, 200)]
    m = curve_measures(_result("cls", never), threshold=0.9, steps=200)
    assert math.isinf(m["steps_to_solve"]) and m["auc"] == pytest.approx(1 / 3)
    # regression: score 1 - mse/(1/6), clipped to [0, 1] in the area (worse than memoryless: 0)
    reg = [{"step": 50, "loss": 1.0}, {"step": 100, "loss": 1 / 60}]
    m = curve_measures(_result("reg", reg), threshold=0.9, steps=100)
    assert m["auc"] == pytest.approx(0.5 * 0.9) and m["steps_to_solve"] == 100
    assert math.isnan(curve_measures({**_result("reg", reg), "curve": []}, 0.9, 100)["auc"])


def test_paired_differences_and_verdict_by_hand(tmp_path):
    study = StudyConfig(name="p", task="delayed_recall", distances=[5, 10], seeds=list(range(5)),
                        rates=[0.25], schemes=["none", "variational", "zoneout"], steps=100,
                        out_dir=str(tmp_path))  # fmt: skip
    base_acc = {0: 0.55, 1: 0.70, 2: 0.40, 3: 0.62, 4: 0.50}
    delta = {  # per scheme and seed, in normalised score: +0.10 ± a little; zoneout ~ 0
        "variational": [0.10, 0.12, 0.08, 0.11, 0.09],
        "zoneout": [0.05, -0.06, 0.04, -0.05, 0.01],
    }
    results = []
    for d in (5, 10):
        for seed, acc in base_acc.items():
            curve = [{"step": 100, "loss": 1.0, "acc": acc}]
            results.append(_result("cls", curve, seed=seed, distance=d))
            for scheme, ds in delta.items():
                a = acc + ds[seed] * 0.75  # normalised score = (acc - 0.25) / 0.75
                curve = [{"step": 100, "loss": 1.0, "acc": a}]
                results.append(_result("cls", curve, seed=seed, scheme=scheme, rate=0.25,
                                       distance=d))  # fmt: skip
    for r in results:
        r["cell"]["task"] = None
    rows = paired_differences(study, results)
    assert {(r["scheme"], r["distance"]) for r in rows} == {
        (s, d) for s in delta for d in (5, 10)}  # fmt: skip
    for r in rows:
        xs = delta[r["scheme"]]
        mean = sum(xs) / 5
        sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / 4)
        assert r["d_score"] == pytest.approx(mean)
        assert r["d_score_ci"] == pytest.approx(t_quantile(4) * sd / math.sqrt(5))
        assert r["d_auc"] == pytest.approx(mean)  # one validation at the end: area = score
        assert r["seeds"] == 5 and r["baseline"] == "none"
    calls = {v["scheme"]: v["score_call"] for v in verdict(rows)}
    assert calls == {"variational": "better", "zoneout": "unresolved"}
    # the same deltas negated: worse
    for r in results:
        if r["cell"]["scheme"] == "variational":
            r["curve"][0]["acc"] = r["metrics"]["acc"] = (
                2 * base_acc[r["cell"]["seed"]] - r["curve"][0]["acc"]
            )
    calls = {v["scheme"]: v["score_call"] for v in verdict(paired_differences(study, results))}
    assert calls["variational"] == "worse"
    # a missing baseline seed is left out of the pairing, not paired with another seed
    results = [r for r in results if not (r["cell"]["scheme"] == "none" and r["cell"]["seed"] == 4)]
    rows = paired_differences(study, results)
    assert all(r["seeds"] == 4 and 4 not in r["d_score_per_seed"] for r in rows)


def test_pairs_across_machines_are_counted_and_flagged(tmp_path):
    """Cells whose `machine` (ISA, torch, threads) differs from their baseline's are counted
    per row and the verdict warns; results without the record (older runs) are not."""
    from rnndrop.study.verdict import verdict_markdown

    study = StudyConfig(name="m", task="delayed_recall", distances=[5], seeds=[0, 1, 2],
                        rates=[0.25], schemes=["none", "zoneout"], steps=100,
                        out_dir=str(tmp_path))  # fmt: skip
    here = {"isa": "AVX512", "torch": "2.13.0", "threads": 1, "cpu": "a"}
    results = []
    for seed in (0, 1, 2):
        curve = [{"step": 100, "loss": 1.0, "acc": 0.5 + 0.1 * seed}]
        results.append(_result("cls", curve, seed=seed))
        results.append(_result("cls", curve, seed=seed, scheme="zoneout", rate=0.25))
    for r in results:
        r["cell"]["task"] = None
    rows = paired_differences(study, results)  # no record anywhere: nothing flagged
    assert rows[0]["mixed_machines"] == 0
    assert "different machines" not in verdict_markdown(study, rows, verdict(rows))
    for r in results:  # same ISA/torch/threads, another CPU name: the same machine
        r["machine"] = {**here, "cpu": r["cell"]["scheme"]}
    rows = paired_differences(study, results)
    assert rows[0]["mixed_machines"] == 0
    results[1]["machine"] = {**here, "isa": "AVX2"}  # seed 0's zoneout cell elsewhere
    results[3]["machine"] = {**here, "threads": 2}  # seed 1's too
    rows = paired_differences(study, results)
    assert rows[0]["mixed_machines"] == 2
    md = verdict_markdown(study, rows, verdict(rows))
    assert "2 of 3 pairs compare cells run on different machines" in md


def test_a_run_records_its_machine(tmp_path):
    from rnndrop.study.common import machine

    m = machine()
    assert m["isa"] == torch.backends.cpu.get_cpu_capability()
    assert m["torch"] == torch.__version__ and m["threads"] == torch.get_num_threads()


# --- end to end ------------------------------------------------------------------------------


def test_multi_task_study_end_to_end_writes_reports_and_verdict(tmp_path):
    study = tiny(tmp_path)
    results = run_study(study, progress=False)
    assert len(results) == len(study.cells()) and all(r["status"] == "ok" for r in results)
    for r in results:  # a validation every val_every steps, recorded as the learning curve
        assert [p["step"] for p in r["curve"]] == [2, 4, 6]
        assert r["cell"]["task"] in TASKS
        assert r["machine"]["isa"] == torch.backends.cpu.get_cpu_capability()
    paths, markdown = write_reports(study, results)
    assert (tmp_path / "v2" / "copy" / "summary.md").exists()
    assert (tmp_path / "v2" / "adding" / "summary.md").exists()
    text = paths["verdict"].read_text()
    assert "copy p=0.3" in text and "adding p=0.3" in text and "variational" in text
    rows = list(csv.DictReader(paths["paired_csv"].open()))
    assert {(r["task"], r["distance"]) for r in rows} == {("copy", "3"), ("copy", "5"),
                                                            ("adding", "4")}  # fmt: skip
    assert all(r["seeds"] == "2" and r["mixed_machines"] == "0" for r in rows)
    assert "different machines" not in text  # one machine ran every cell
    assert paths["verdict_png"].stat().st_size > 0
    assert "verdict against no dropout" in markdown


def _children(pid: int) -> set[int]:
    out = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.add(int(stat.parent.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigterm_stops_every_worker_and_keeps_finished_cells(tmp_path):
    config = tiny(
        tmp_path,
        tasks={},
        task="copy",
        task_args={"n_copy": 2, "n_symbols": 4},
        distances=[3, 4, 5],
        seeds=[0, 1],
        steps=4000,
        val_every=4000,
    ).to_dict()
    config.pop("tasks"), config.pop("variants")
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = subprocess.Popen(
        [sys.executable, "-m", "rnndrop.study", "long-range", "--config", str(path),
         "--workers", "2", "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )  # fmt: skip
    study = load_study(path)
    deadline = time.time() + 120
    workers: set[int] = set()
    while time.time() < deadline:  # until both workers are training a cell
        workers = {c for c in _children(proc.pid) if "resource_tracker" not in
                   Path(f"/proc/{c}/cmdline").read_bytes().decode(errors="replace")}  # fmt: skip
        started = list(Path(study.root).rglob("events.out.tfevents.*"))
        if len(workers) >= 2 and len(started) >= 2:
            break
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.5)
    else:
        pytest.fail("the workers did not start training")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "run the same command again" in err
    deadline = time.time() + 10
    while any(_alive(w) for w in workers) and time.time() < deadline:
        time.sleep(0.2)
    assert not any(_alive(w) for w in workers), "a worker outlived the study"
    # no cell is finished by the interrupt, and nothing half-written is left
    assert not any(is_finished(study, c) for c in study.cells())
    assert not list(Path(study.root).rglob("*.json.tmp"))
    assert all(load_result(study, c) is None for c in study.cells())


def test_only_selects_a_slice_and_keeps_the_baseline_under_a_rate_filter(tmp_path):
    from rnndrop.study.cli import select_cells

    study = tiny(tmp_path, rates=[0.1, 0.3])
    cells = study.cells()
    got = {cells[i] for i in select_cells(cells, ["task=copy", "rate=0.3", "seed=1"])}
    assert got == {c for c in cells if c.task == "copy" and c.seed == 1
                   and c.rate in (None, 0.3)}  # fmt: skip
    assert {c.scheme for c in got} == {"none", "variational"}
    for bad in (["colour=red"], ["seed"], ["seed="]):
        with pytest.raises(ValueError, match="KEY=V1,V2"):
            select_cells(cells, bad)
    with pytest.raises(ValueError, match="no cell"):
        select_cells(cells, ["seed=9"])


def test_cells_run_seed_major(tmp_path, monkeypatch):
    """A sweep stopped early leaves whole seeds: every cell's seed 0 runs before any seed 1."""
    from rnndrop.study import runner

    order = []

    def fake(study, cell, **kw):
        order.append(cell)
        return {"cell": {"label": cell.label, "distance": cell.distance, "seed": cell.seed},
                "status": "skipped", "metrics": {}}  # fmt: skip

    monkeypatch.setattr(runner, "run_cell", fake)
    study = tiny(tmp_path)
    run_study(study, progress=False)
    assert sorted(order, key=lambda c: c.seed) == order and len(order) == len(study.cells())
    assert order[0].seed == 0 and order[-1].seed == 1
