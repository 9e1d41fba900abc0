"""Study v3: the data-regime axis (train_size), the selective-copying task, plain progress
lines off a terminal."""

import csv
import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch

from rnndrop.data import TASKS, SelectiveCopy, make_task
from rnndrop.study import StudyConfig, load_study, run_study
from rnndrop.study.verdict import write_reports

ROOT = Path(__file__).parents[1]


def tiny(tmp_path, **kw) -> StudyConfig:
    base = dict(
        name="t", task="selective_copy", task_args={"n_copy": 2, "n_symbols": 4, "n_noise": 3},
        distances=[4], seeds=[0], rates=[0.3], schemes=["none", "variational"],
        model={"hidden_size": 8, "embedding_size": 4}, steps=6, batch_size=4, val_every=3,
        eval_size=16, mc_samples=0, out_dir=str(tmp_path),
    )  # fmt: skip
    base.update(kw)
    return StudyConfig(**base)


# --- the hash of the unlimited regime ------------------------------------------------------


def test_unlimited_regime_keeps_the_published_v2_hashes():
    """Study v2's published cells (docs/results/v2/*/results.csv, hashes written when they ran)
    keep their hashes: train_size null adds nothing to a cell's spec."""
    study = load_study(ROOT / "experiments" / "long_range" / "v2.yaml")
    assert study.train_size is None
    hashes = {str(c): study.cell_hash(c) for c in study.cells()}
    rows = [
        r
        for task in ("delayed_recall", "copy", "adding")
        for r in csv.DictReader((ROOT / "docs/results/v2" / task / "results.csv").open())
    ]
    assert len(rows) > 100
    for r in rows:
        key = f"{r['task']} {r['label']} d={r['distance']} seed={r['seed']}"
        assert hashes[key] == r["config_hash"], key
    # one literal, copied from the CSV: `copy none d=20 seed=0` ran with hash a6f00a6b0953
    assert hashes["copy none d=20 seed=0"] == "a6f00a6b0953"


def test_published_v3_slice_matches_its_config():
    """The measured v3 slice (docs/results/v3, one folder per regime x task) ran the cells of
    experiments/long_range/v3.yaml: each row's hash, written when it ran, is the config's, and
    the finite regime's rows record their training-set size."""
    study = load_study(ROOT / "experiments" / "long_range" / "v3.yaml")
    hashes = {str(c): study.cell_hash(c) for c in study.cells()}
    folders = sorted(p for p in (ROOT / "docs/results/v3").iterdir() if p.is_dir())
    assert {f.name for f in folders} >= {"delayed_recall", "delayed_recall_n64"}
    for folder in folders:
        rows = list(csv.DictReader((folder / "results.csv").open()))
        # each measured (scheme-rate, distance) has all 5 paired seeds, none included
        seeds: dict[tuple[str, str], set[str]] = {}
        for r in rows:
            seeds.setdefault((r["label"], r["distance"]), set()).add(r["seed"])
        assert all(v == {"0", "1", "2", "3", "4"} for v in seeds.values()), folder.name
        assert len(rows) == 5 * len(seeds), folder.name
        for distance in {d for _, d in seeds}:
            assert ("none", distance) in seeds, (folder.name, distance)
        for r in rows:
            key = f"{folder.name} {r['label']} d={r['distance']} seed={r['seed']}"
            assert hashes[key] == r["config_hash"], key
            size = re.search(r"_n(\d+)$", folder.name)  # the label names the finite regime
            assert r["train_size"] == (size.group(1) if size else ""), key


def test_train_size_is_part_of_a_finite_cells_hash(tmp_path):
    unlimited = tiny(tmp_path)
    explicit = tiny(tmp_path, train_size=None)
    finite = tiny(tmp_path, train_size=64)
    cell = unlimited.cells()[0]
    assert unlimited.cell_hash(cell) == explicit.cell_hash(cell)
    assert finite.cell_hash(cell) != unlimited.cell_hash(cell)
    assert finite.cell_hash(cell) != tiny(tmp_path, train_size=128).cell_hash(cell)
    assert finite.cell_spec(cell)["train"]["train_size"] == 64
    assert "train_size" not in unlimited.cell_spec(cell)["train"]


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "64"])
def test_train_size_must_be_a_positive_integer_or_null(tmp_path, bad):
    with pytest.raises(ValueError, match="train_size"):
        tiny(tmp_path, train_size=bad)


def test_regimes_as_tasks_of_one_study(tmp_path):
    """The same task twice, unlimited and scarce: a regime per task label, with its own
    cells, hashes and report heading."""
    task = {"task": "selective_copy", "task_args": {"n_copy": 2, "n_symbols": 4},
            "distances": [4]}  # fmt: skip
    study = tiny(tmp_path, task="copy", task_args={}, distances=[10],
                 tasks={"sc": task, "sc_n32": {**task, "train_size": 32}})  # fmt: skip
    assert study.for_task("sc").train_size is None
    assert study.for_task("sc_n32").train_size == 32
    a, b = (c for c in study.cells() if c.scheme == "none")
    assert (a.task, b.task) == ("sc", "sc_n32")
    assert study.cell_hash(a) != study.cell_hash(b)
    with pytest.raises(ValueError, match="train_size"):
        tiny(tmp_path, task="copy", task_args={}, tasks={"sc": {**task, "train_size": 0}})


def test_a_tasks_study_is_built_once_and_again_after_a_change(tmp_path):
    """for_task is asked once per result by a report: it builds (and validates) a task's
    study once, and builds it again when a setting of the whole study has changed."""
    task = {"task": "selective_copy", "task_args": {"n_copy": 2, "n_symbols": 4},
            "distances": [4]}  # fmt: skip
    study = tiny(tmp_path, task="copy", task_args={}, distances=[10], tasks={"sc": task})
    first = study.for_task("sc")
    assert study.for_task("sc") is first
    study.steps += 1
    assert study.for_task("sc").steps == first.steps + 1
    study.tasks["sc"]["distances"] = [5]  # a change inside a task's settings counts too
    assert study.for_task("sc").distances == [5]
    study.tasks["sc"]["distances"] = [0]
    with pytest.raises(ValueError, match="distances"):
        study.for_task("sc")


def test_a_task_sweeps_rates_at_some_distances_only(tmp_path):
    """A task's ``rates: {d: [...]}`` sweeps them at d and runs the study's rates elsewhere;
    a list replaces the study's rates for the task; cells keep the hashes and folders they
    have in the full rate x distance grid, so finished cells of that grid are reused."""
    task = {"task": "selective_copy", "task_args": {"n_copy": 2, "n_symbols": 4},
            "distances": [4, 6, 8]}  # fmt: skip
    kw = dict(task="copy", task_args={}, distances=[10])
    full = tiny(tmp_path, **kw, rates=[0.1, 0.25, 0.5], tasks={"sc": task})
    swept = {**task, "rates": {6: [0.1, 0.25, 0.5]}}
    study = tiny(tmp_path, **kw, rates=[0.25], tasks={"sc": swept, "own": {**task, "rates": [0.4]}})
    got = {(c.task, c.scheme, c.rate, c.distance) for c in study.cells()}
    want = {("sc", "none", None, d) for d in (4, 6, 8)}
    want |= {("sc", "variational", 0.25, d) for d in (4, 6, 8)}
    want |= {("sc", "variational", p, 6) for p in (0.1, 0.5)}
    want |= {("own", s, p, d) for s, p in (("none", None), ("variational", 0.4)) for d in (4, 6, 8)}
    assert got == want and len(study.cells()) == len(want)
    assert study.for_task("sc").rates_for("variational") == [0.1, 0.25, 0.5]
    assert study.for_task("sc").rates_for("variational", 4) == [0.25]
    assert study.for_task("sc").rates_for("none", 6) == [None]
    by_key = {(c.scheme, c.rate, c.distance): c for c in full.cells()}
    for c in study.cells():
        if c.task == "sc":
            twin = by_key[c.scheme, c.rate, c.distance]
            assert study.cell_hash(c) == full.cell_hash(twin)
            assert study.cell_dir(c) == full.cell_dir(twin)


def test_the_verdict_has_a_table_per_regime_and_names_partial_distances(tmp_path):
    """Two regimes, the scarce one with a rate swept at one distance: one score table per
    regime, only the (task, rate) columns that ran, an entry measured at fewer distances
    than its task's names them, and each entry is the mean of its seeds' paired
    differences, recomputed here from the results."""
    from rnndrop.study.report import score

    task = {"task": "selective_copy", "task_args": {"n_copy": 2, "n_symbols": 4},
            "distances": [4, 6]}  # fmt: skip
    # every score counts as solved: "solved up to" then shows which distances were measured
    study = tiny(tmp_path, task="copy", task_args={}, distances=[10], rates=[0.3], seeds=[0, 1],
                 solved_threshold=-99.0, tasks={"sc": task, "sc_n8": {
                     **task, "train_size": 8, "rates": {6: [0.1, 0.3]}}})  # fmt: skip
    results = run_study(study, progress=False)
    assert len(results) == 18 and all(r["status"] == "ok" for r in results)
    write_reports(study, results)
    md = (study.study_root / "verdict.md").read_text()
    head_u = "## Final score — unlimited data (fresh sequences every step)"
    head_8 = "## Final score — 8 training sequences (fixed set, epochs over it)"
    assert head_u in md and head_8 in md
    table_u = md.split(head_u)[1].split("##")[0]
    table_8 = md.split(head_8)[1].split("##")[0]
    assert "| scheme | sc p=0.3 |" in table_u and "p=0.1" not in table_u
    assert "| scheme | sc_n8 p=0.1 | sc_n8 p=0.3 |" in table_8
    (row,) = [line for line in table_8.splitlines() if line.startswith("| variational |")]
    swept, shared = row.split(" | ")[1:3]
    assert swept.endswith("(d=6)") and "(d=" not in shared

    def cell(rate, d, seed):
        c = next(r for r in results if r["cell"]["task"] == "sc_n8" and r["cell"]["rate"] == rate
                 and r["cell"]["distance"] == d and r["cell"]["seed"] == seed)  # fmt: skip
        return score(c)

    want = sum(cell(0.1, 6, s) - cell(None, 6, s) for s in (0, 1)) / 2
    assert f"{want:+.2f}" in swept
    want = sum(cell(0.3, d, s) - cell(None, d, s) for s in (0, 1) for d in (4, 6)) / 4
    assert f"{want:+.2f}" in shared
    assert "8 training sequences (fixed set, epochs over it): final score:" in md
    assert "of 3 (scheme, rate, task) comparisons" in md
    summary = (study.study_root / "sc_n8" / "summary.md").read_text()
    assert re.search(r"^\| variational_p0\.3 \|.* \| 6 \|$", summary, re.M)
    assert re.search(r"^\| variational_p0\.1 \| – \|.* \| – \|$", summary, re.M)  # d=4 unmeasured
    hours = sum(r["seconds"] for r in results) / 3600
    assert f"Measured: 18 of the grid's 18 cells, {hours:.1f} hours of cell time" in md


@pytest.mark.parametrize("rates, match", [
    ({5: [0.1]}, "5 is not one of the task's distances"),
    ({"6": [0.1]}, "'6' is not one of the task's distances"),
    ({6: 0.1}, r"rates\.6: give a non-empty list"),
    ({6: []}, r"rates\.6: give a non-empty list"),
    ({6: [1.5]}, "variational"),
    ("0.1", "give a list of rates or"),
    ([], "give a list of rates or"),
])  # fmt: skip
def test_bad_task_rates_are_refused_with_the_fix(tmp_path, rates, match):
    task = {"task": "selective_copy", "task_args": {"n_copy": 2, "n_symbols": 4},
            "distances": [4, 6], "rates": rates}  # fmt: skip
    with pytest.raises(ValueError, match=match):
        tiny(tmp_path, task="copy", task_args={}, distances=[10], tasks={"sc": task})


# --- the finite regime overfits, on held-out data outside the training set ------------------


def test_no_dropout_overfits_a_tiny_training_set(tmp_path):
    """16 selective-copy sequences, 200 steps: without dropout the LSTM learns its training
    set (train accuracy >= 0.99) and not the task (held-out accuracy near chance, 1/8); the
    held-out sequences are outside the training set. About 3 s."""
    study = StudyConfig(
        name="of", task="selective_copy", task_args={"n_copy": 4, "n_symbols": 8, "n_noise": 8},
        distances=[10], train_size=16, seeds=[0], schemes=["none"],
        model={"hidden_size": 32, "embedding_size": 8}, steps=200, batch_size=8, lr=0.01,
        val_every=100, eval_size=128, mc_samples=0, out_dir=str(tmp_path),
    )  # fmt: skip
    (r,) = run_study(study, progress=False)
    assert r["status"] == "ok"
    assert r["train_metrics"]["acc"] >= 0.99
    assert r["metrics"]["acc"] < 0.5  # chance is 0.125
    assert r["regime"] == {"train_size": 16, "heldout_in_train": 0.0}
    # the splits directly: no test (or val) sequence is one of the 16 training sequences
    kw = {"n_copy": 4, "n_symbols": 8, "n_noise": 8}
    train = make_task("selective_copy", 10, size=16, seed=0, split="train", **kw)
    seen = {tuple(x.tolist()) for x, _ in train}
    assert len(seen) == 16
    for split in ("val", "test"):
        held = make_task("selective_copy", 10, size=128, seed=0, split=split, **kw)
        assert not seen & {tuple(x.tolist()) for x, _ in held}
    # the report shows train, held-out and gap
    paths, md = write_reports(study, [r])
    assert "Train score / held-out score / gap" in md
    assert "16 training sequences" in md
    (row,) = list(csv.DictReader(paths["csv"].open()))
    assert float(row["train_score"]) >= 0.99 and float(row["gap"]) > 0.5


def test_finite_training_set_is_the_first_n_of_the_stream_and_is_reused(tmp_path):
    """A finite cell trains on items 0..N-1 of the train split (epochs over them); the
    unlimited one on steps * batch_size distinct items."""
    from rnndrop.data import SyntheticDataModule
    from rnndrop.study.runner import train_subset

    dm = SyntheticDataModule("selective_copy", 6, {"n_copy": 2}, train_size=5, batch_size=2)
    seqs = [tuple(x.tolist()) for batch in (dm.train_dataloader(), dm.train_dataloader())
            for xs, _ in batch for x in xs]  # fmt: skip
    assert len(seqs) == 10 and len(set(seqs)) == 5  # two epochs over the same five
    first = make_task("selective_copy", 6, n_copy=2, size=5, seed=0, split="train")
    assert set(seqs) == {tuple(x.tolist()) for x, _ in first}
    assert sum(len(x) for x, _ in train_subset(dm, 100, 4)) == 5  # all of them, once
    assert sum(len(x) for x, _ in train_subset(dm, 3, 4)) == 3


def test_heldout_overlap_is_counted_on_a_small_input_space(tmp_path):
    """Copy with 1 symbol of 2 has 2 possible sequences: every held-out sequence is in a
    training set of 8, and the result says so."""
    study = tiny(tmp_path, task="copy", task_args={"n_copy": 1, "n_symbols": 2}, distances=[2],
                 train_size=8, schemes=["none"])  # fmt: skip
    (r,) = run_study(study, progress=False)
    assert r["regime"]["heldout_in_train"] == 1.0
    _, md = write_reports(study, [r])
    assert "also occur in the training set: up to 100.0%" in md


# --- the noisy task ---------------------------------------------------------------------------


def test_selective_copy_layout():
    task = SelectiveCopy(12, n_symbols=5, n_copy=3, n_noise=4, size=50, seed=1)
    assert TASKS["selective_copy"] is SelectiveCopy
    assert (task.seq_len, task.vocab_size, task.num_classes) == (16, 11, 5)
    assert task.baseline_loss == pytest.approx(torch.log(torch.tensor(5.0)).item())
    noise_seen, positions = set(), set()
    for x, y in task:
        region = x[:12]
        data_at = (region < 5).nonzero().flatten()
        assert len(data_at) == 3  # K data tokens in the noisy region, the rest noise
        noise = region[region >= 5]
        assert ((noise >= 5) & (noise <= 8)).all()
        noise_seen |= set(noise.tolist())
        positions.add(tuple(data_at.tolist()))
        assert x[12] == 9 and (x[13:] == 10).all()  # delimiter, then blanks
        assert (y[:13] == -100).all()
        assert y[13:].tolist() == region[data_at].tolist()  # in order
    assert noise_seen == {5, 6, 7, 8}  # random noise tokens, not one blank
    assert len(positions) > 30  # the data sit at random positions
    a, b = SelectiveCopy(12, size=3, seed=7)[2], SelectiveCopy(12, size=3, seed=7)[2]
    assert torch.equal(a[0], b[0])
    with pytest.raises(ValueError, match="n_copy"):
        SelectiveCopy(3, n_copy=4)


def test_selective_copy_accuracy_counts_only_the_recall_steps():
    task = SelectiveCopy(8, n_symbols=4, n_copy=2, size=4)
    _, y = task[0]
    assert task.memory_mask(y).tolist() == [False] * 9 + [True] * 2


def test_selective_copy_from_rnndrop_fit(tmp_path):
    """The task runs from a `rnndrop fit` config, with a fixed training set (train_size)."""
    from rnndrop.__main__ import main

    rc = main([
        "fit", "--config", str(ROOT / "experiments/synthetic/base.yaml"),
        "--config", str(ROOT / "experiments/synthetic/selective_copy.yaml"),
        "--data.init_args.distance", "6", "--data.init_args.train_size", "16",
        "--data.init_args.val_size", "8", "--data.init_args.batch_size", "8",
        "--model.init_args.model.init_args.hidden_size", "8", "--trainer.max_steps", "3",
        "--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar", "false",
    ])  # fmt: skip
    assert rc in (0, None)
    assert list(tmp_path.rglob("config.yaml"))


# --- progress off a terminal -------------------------------------------------------------


def test_study_writes_plain_lines_off_a_terminal(tmp_path, capfd):
    """`rnndrop study ... > log`: progress as plain lines, no tqdm redraws (\\r) or cursor
    escapes (ESC[A); both streams here are pipes, not terminals."""
    from rnndrop.study.cli import main as study_main

    cfg = tmp_path / "s.yaml"
    cfg.write_text(json.dumps({
        "name": "plain", "task": "selective_copy",
        "task_args": {"n_copy": 2, "n_symbols": 4}, "distances": [4], "seeds": [0],
        "schemes": ["none", "variational"], "rates": [0.3],
        "model": {"hidden_size": 8, "embedding_size": 4}, "steps": 6, "batch_size": 4,
        "val_every": 3, "eval_size": 8, "mc_samples": 0, "out_dir": str(tmp_path / "runs"),
    }))  # fmt: skip
    assert study_main(["long-range", "--config", str(cfg), "--workers", "1"]) == 0
    out, err = capfd.readouterr()
    assert "\x1b[" not in out + err and "\r" not in out + err
    lines = out.splitlines()
    assert any(ln.startswith("none d=4 seed=0: acc") for ln in lines)
    assert any(ln.startswith("variational_p0.3 d=4 seed=0: acc") for ln in lines)


def test_a_result_found_by_hash_under_another_task_label_pairs_as_this_study_cell(tmp_path):
    """The cell hash leaves out the task label, so a baseline cell copied from a study that
    labelled its task (``sc_n16``) into a one-task study is recognised as finished; it must
    then be reported as this study's cell and pair with the schemes run here."""
    import shutil

    from rnndrop.study.config import LongRangeRun
    from rnndrop.study.verdict import paired_differences

    task = {"task": "selective_copy", "task_args": {"n_copy": 2, "n_symbols": 4, "n_noise": 3},
            "distances": [4], "train_size": 16}  # fmt: skip
    labelled = tiny(tmp_path, name="a", tasks={"sc_n16": task}, schemes=["none"],
                    seeds=[0, 1])  # fmt: skip
    one = tiny(tmp_path, name="b", **task, schemes=["none", "variational"], seeds=[0, 1])
    run_study(labelled, progress=False)
    for seed in (0, 1):
        a, b = (
            LongRangeRun("none", None, 4, seed, task="sc_n16"),
            LongRangeRun("none", None, 4, seed),
        )
        assert labelled.cell_hash(a) == one.cell_hash(b)
        shutil.copytree(labelled.cell_dir(a), one.cell_dir(b))
    results = run_study(one, progress=False)
    assert {r["cell"]["task"] for r in results} == {None}
    assert sorted((r["cell"]["scheme"], r["cell"]["seed"]) for r in results) == [
        ("none", 0), ("none", 1), ("variational", 0), ("variational", 1)]  # fmt: skip
    (row,) = paired_differences(one, results)
    assert row["scheme"] == "variational" and row["baseline"] == "none" and row["seeds"] == 2


# --- rnndrop tune ---------------------------------------------------------------------------


def _tune_config(tmp_path, **tune) -> Path:
    cfg = tmp_path / "tune.yaml"
    cfg.write_text(json.dumps({
        "name": "tt", "task": "selective_copy", "task_args": {"n_copy": 2, "n_symbols": 4},
        "distances": [4], "train_size": 16, "seeds": [0, 1, 2, 3, 4],
        "schemes": ["none", "variational", "zoneout"], "rates": [0.25],
        "model": {"hidden_size": 8, "embedding_size": 4}, "steps": 4, "batch_size": 4,
        "val_every": 2, "eval_size": 8, "mc_samples": 0, "out_dir": str(tmp_path / "runs"),
        "tune": {"trials": 2, "search_seeds": [100], "rate_range": [0.1, 0.5], **tune},
    }))  # fmt: skip
    return cfg


def test_tune_searches_each_scheme_alike_then_evaluates_on_unseen_seeds(tmp_path):
    """Two trials per scheme in the storage given by URL; the chosen rate is the best trial's
    and within the range; the evaluation runs the chosen rates on seeds the search never
    used, paired with no dropout. About 20 s."""
    import optuna

    from rnndrop.config import RecurrentDropout as RD
    from rnndrop.study.tune import main as tune_main

    db = tmp_path / "elsewhere" / "search.db"
    db.parent.mkdir()
    url = f"sqlite:///{db}"
    cfg = _tune_config(tmp_path)
    assert tune_main(["--config", str(cfg), "--storage", url, "--no-progress"]) == 0
    root = tmp_path / "runs" / "tt"
    assert db.is_file() and not (root / "optuna.db").exists()  # the URL, not the default
    assert sorted(optuna.get_all_study_names(url)) == [
        "tt/selective_copy/variational",
        "tt/selective_copy/zoneout",
    ]
    chosen = json.loads((root / "tune.json").read_text())["chosen"]
    done = optuna.trial.TrialState.COMPLETE
    for scheme in ("variational", "zoneout"):
        trials = optuna.load_study(study_name=f"tt/selective_copy/{scheme}", storage=url)
        trials = [t for t in trials.trials if t.state == done]
        assert len(trials) == 2  # the same budget for every scheme
        best = sorted(trials, key=lambda t: (-t.value, t.number))[0]
        assert chosen[scheme]["rate"] == best.params["rate"]
        assert 0.1 <= chosen[scheme]["rate"] <= 0.5
    # a second search run adds no trial: the budget is per scheme, not per run
    assert tune_main(["--config", str(cfg), "--storage", url, "--phase", "search",
                      "--no-progress"]) == 0  # fmt: skip
    for scheme in ("variational", "zoneout"):
        s = optuna.load_study(study_name=f"tt/selective_copy/{scheme}", storage=url)
        assert len([t for t in s.trials if t.state == done]) == 2
    # search cells ran on the search seed only, evaluation cells on the evaluation seeds only
    search = {json.loads(p.read_text())["cell"]["seed"]
              for p in (root / "search").rglob("result.json")}  # fmt: skip
    evaluated = [json.loads(p.read_text()) for p in (root / "eval").rglob("result.json")]
    assert search == {100}
    assert {r["cell"]["seed"] for r in evaluated} == {0, 1, 2, 3, 4}
    # each tuned scheme ran at its chosen rate: its preset at that rate, built here
    by_scheme = {r["cell"]["scheme"]: r for r in evaluated}
    assert set(by_scheme) == {"none", "variational_tuned", "zoneout_tuned"}
    p_var, p_zo = chosen["variational"]["rate"], chosen["zoneout"]["rate"]
    spec = by_scheme["variational_tuned"]["spec"]["dropout"]
    assert {k: v for k, v in spec.items() if k in RD.variational(p_var).to_dict()} == {
        k: v for k, v in RD.variational(p_var).to_dict().items() if k in spec
    }
    assert by_scheme["zoneout_tuned"]["spec"]["dropout"]["zoneout_hidden"] == p_zo
    report = (root / "tune.md").read_text()
    assert f"| variational | [0.1, 0.5] | {p_var:g} |" in report
    assert "| none (baseline, no rate) |" in report
    assert (root / "eval" / "verdict.md").is_file()


def test_tune_report_flags_a_chosen_rate_at_the_edge_of_its_range():
    """A best rate in the top or bottom tenth of the searched range is named in the report:
    the scheme's optimum may lie outside it. Range [0.05, 0.6]: tenths at 0.105 and 0.545."""
    from rnndrop.study.tune import at_range_edge, edge_notes

    assert at_range_edge(0.58, 0.05, 0.6) == "upper"
    assert at_range_edge(0.55, 0.05, 0.6) == "upper"
    assert at_range_edge(0.54, 0.05, 0.6) is None
    assert at_range_edge(0.3, 0.05, 0.6) is None
    assert at_range_edge(0.11, 0.05, 0.6) is None
    assert at_range_edge(0.1, 0.05, 0.6) == "lower"
    chosen = {"naive": {"rate": 0.3, "range": [0.05, 0.6]},
              "zoneout": {"rate": 0.58, "range": [0.05, 0.6]},
              "variational": {"rate": 0.12, "range": [0.1, 0.5]}}  # fmt: skip
    notes = edge_notes(chosen)
    assert len(notes) == 2
    assert "zoneout: chosen rate 0.58 is in the upper tenth" in notes[0]
    assert "above 0.6" in notes[0] and "tune.rate_ranges.zoneout" in notes[0]
    assert "variational: chosen rate 0.12 is in the lower tenth" in notes[1]
    assert "below 0.1" in notes[1]


def test_tune_refuses_search_seeds_among_the_evaluation_seeds(tmp_path):
    from rnndrop.study.tune import load_tune

    with pytest.raises(ValueError, match="search never saw"):
        load_tune(_tune_config(tmp_path, search_seeds=[3]))


def test_tune_evaluate_needs_a_finished_search(tmp_path, capsys):
    from rnndrop.study.tune import main as tune_main

    rc = tune_main(["--config", str(_tune_config(tmp_path)), "--phase", "evaluate"])
    assert rc == 2 and "not finished" in capsys.readouterr().err


def test_slurm_tune_script_shares_one_storage(tmp_path):
    """experiments/long_range/slurm_tune.sh as SLURM runs it: two array tasks search into one
    storage URL (the second finds the budget spent and adds nothing), then EVALUATE=1."""
    import os
    import subprocess
    import sys

    import optuna

    script = ROOT / "experiments" / "long_range" / "slurm_tune.sh"
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    env = {**os.environ, "TUNE_CONFIG": str(_tune_config(tmp_path)), "TUNE_STORAGE": url,
           "TUNE_OUT": str(tmp_path / "out"),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # fmt: skip
    for task_id in ("0", "1"):
        subprocess.run(["bash", str(script)], env={**env, "SLURM_ARRAY_TASK_ID": task_id},
                       check=True, capture_output=True)  # fmt: skip
    for name in ("variational", "zoneout"):
        s = optuna.load_study(study_name=f"tt/selective_copy/{name}", storage=url)
        assert len(s.trials) == 2
    done = subprocess.run(["bash", str(script)], env={**env, "EVALUATE": "1"}, check=True,
                          capture_output=True, text=True)  # fmt: skip
    assert "| zoneout | [0.1, 0.5] |" in done.stdout
    assert (tmp_path / "out" / "tt" / "tune.md").is_file()
    assert not (tmp_path / "out" / "tt" / "optuna.db").exists()


def test_fit_data_module_unlimited_regime_never_repeats_a_sequence():
    """SyntheticDataModule(train_size=None): every epoch draws epoch_size sequences that no
    earlier epoch drew; a finite train_size repeats its set."""
    from rnndrop.data import SyntheticDataModule

    dm = SyntheticDataModule("delayed_recall", 3, {"n_symbols": 4, "length": 12},
                             train_size=None, epoch_size=6, batch_size=3)  # fmt: skip
    loader = dm.train_dataloader()
    epochs = [[tuple(x.tolist()) for xs, _ in loader for x in xs] for _ in range(3)]
    assert [len(e) for e in epochs] == [6, 6, 6]
    assert len(set(epochs[0] + epochs[1] + epochs[2])) == 18  # 4^12 sequences: no coincidence
    # the first epoch is items 0..5 of the stream, the second 6..11
    stream = make_task("delayed_recall", 3, n_symbols=4, length=12, size=12, seed=0)
    assert set(epochs[1]) == {tuple(stream[i][0].tolist()) for i in range(6, 12)}
    held = {tuple(x.tolist()) for xs, _ in dm.val_dataloader() for x in xs}
    assert not held & set(epochs[0] + epochs[1] + epochs[2])


def test_tune_without_optuna_names_the_extra():
    import subprocess
    import sys

    code = (
        "import sys\nsys.modules['optuna'] = None\nfrom rnndrop.__main__ import main\n"
        "raise SystemExit(main(['tune', '--config', 'x.yaml']))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert res.returncode == 2 and "pip install 'rnndrop[tune]'" in res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize(
    ("config", "task", "train_size"),
    [
        ("tune_selective_copy", "selective_copy", 64),
        ("tune_selective_copy_high", "selective_copy", 64),
        ("tune_delayed_recall", "delayed_recall", 128),
        ("tune_delayed_recall_low", "delayed_recall", 128),
    ],
)
def test_tune_config_in_experiments_loads_and_runs_one_trial(tmp_path, config, task, train_size):
    """experiments/long_range/tune_*.yaml: a one-task study in a fixed-set regime, search
    seeds apart from the evaluation seeds; one trial of one scheme runs."""
    import optuna

    from rnndrop.study.tune import load_tune, search

    study, settings = load_tune(ROOT / f"experiments/long_range/{config}.yaml",
                                out_dir=str(tmp_path), steps=2, val_every=1, eval_size=8,
                                batch_size=4)  # fmt: skip
    assert study.task == task and study.train_size == train_size and len(study.seeds) >= 5
    assert not set(settings.search_seeds) & set(study.seeds)
    settings = dataclasses.replace(settings, trials=1)
    assert search(study, settings, ["zoneout"], progress=False) == {"zoneout": 1}
    url = f"sqlite:///{(tmp_path / study.name / 'optuna.db').resolve()}"
    assert optuna.get_all_study_names(url) == [f"{study.name}/{task}/zoneout"]
