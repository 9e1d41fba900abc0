"""Issue 19 §4's pieces: training to convergence (PlateauStop), bootstrap intervals of the
context probe, and the context study that uses both (sliced with --only)."""

import json
import math

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from rnndrop.analysis import compare_probes, context_usage, effective_context
from rnndrop.lit import PlateauStop
from rnndrop.study.base import Run
from rnndrop.study.cli import main as study_main
from rnndrop.study.context import ContextStudyConfig
from tests.test_study import LagModel, periodic_stream

# --- PlateauStop ------------------------------------------------------------------------------


class Scripted(L.LightningModule):
    """Validation losses read from a script; the weight moves at every step (so each
    validation's weights differ), and is recorded at each validation."""

    def __init__(self, losses):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.losses, self.k, self.snapshots = list(losses), 0, {}

    def training_step(self, batch, batch_idx):
        return (self.w - 100.0).pow(2).sum()

    def validation_step(self, batch, batch_idx):
        pass

    def on_validation_epoch_end(self):
        self.log("val/loss", self.losses[self.k])
        self.snapshots[self.global_step] = self.w.detach().clone()
        self.k += 1

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.zeros(1000, 1)), batch_size=1)

    def val_dataloader(self):
        return DataLoader(TensorDataset(torch.zeros(1, 1)), batch_size=1)


def _fit(module, callback, max_steps=100):
    trainer = L.Trainer(max_steps=max_steps, val_check_interval=5, check_val_every_n_epoch=None,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0,
                        callbacks=[callback])  # fmt: skip
    trainer.fit(module)
    return trainer


def test_plateau_stop_halves_the_rate_stops_and_restores_the_best_weights():
    # validations at steps 5, 10, ...: best 1.9 at step 20; 15 and 25 do not improve (rate
    # halved each time), 30 is the second in a row without a new best: stop there
    module = Scripted([3.0, 2.0, 2.5, 1.9, 2.2, 2.3, 9.0, 9.0])
    cb = PlateauStop(patience=2, factor=0.5)
    trainer = _fit(module, cb)
    assert trainer.global_step == 30 and cb.stopped_step == 30
    assert cb.best == pytest.approx(1.9) and cb.best_step == 20  # logged as float32
    assert [s for s, _, _ in cb.history] == [5, 10, 15, 20, 25, 30]
    assert [lr for _, _, lr in cb.history] == [0.01, 0.01, 0.01, 0.005, 0.005, 0.0025]
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.00125)
    assert torch.equal(module.w.detach(), module.snapshots[20])  # not the last weights
    assert not torch.equal(module.snapshots[20], module.snapshots[30])


def test_plateau_stop_runs_to_the_cap_while_validation_improves():
    module = Scripted([5.0 - i for i in range(20)])
    cb = PlateauStop(patience=1, factor=0.5)
    trainer = _fit(module, cb, max_steps=20)
    assert trainer.global_step == 20 and cb.stopped_step is None and cb.best_step == 20
    assert trainer.optimizers[0].param_groups[0]["lr"] == 0.01


def test_plateau_stop_rejects_bad_settings_and_a_metric_never_logged():
    with pytest.raises(ValueError, match="patience"):
        PlateauStop(patience=0)
    with pytest.raises(ValueError, match="factor"):
        PlateauStop(patience=1, factor=0.0)
    with pytest.raises(KeyError, match="val/ppl"):
        _fit(Scripted([1.0] * 4), PlateauStop(patience=1, monitor="val/ppl"))


def test_plateau_stop_takes_up_a_run_from_its_record():
    """A checkpoint from before PlateauStop kept state: its history and best weights."""
    cb = PlateauStop(patience=2, factor=0.5)
    w = {"w": torch.ones(1)}
    cb.restore([(10, 3.0, 0.1), (20, 2.0, 0.1), (30, 2.5, 0.1)], w)
    assert (cb.best, cb.best_step, cb._bad) == (2.0, 20, 1)
    restored = PlateauStop(patience=2)
    restored.load_state_dict(cb.state_dict())
    assert restored.state_dict() == cb.state_dict()


# --- bootstrap intervals of the context probe -----------------------------------------------


def test_context_probe_bootstrap_intervals_match_the_normal_interval():
    V, lag, n = 10, 4, 400
    res = context_usage(LagModel(V, lag), periodic_stream(V, lag, 3000), [1, 2, 4, 5, 8],
                        window=20, n_targets=n, bootstrap=2000)  # fmt: skip
    assert res["bootstrap"] == 2000
    for mode in ("shuffle", "replace", "cut"):
        inc, se, ci = res["increase"][mode], res["stderr"][mode], res["ci"][mode]
        assert res["effective"][mode] == effective_context(inc, 0.01 * res["loss"])
        for d in (1, 2, 4):  # the source is perturbed
            lo, hi = ci[d]
            if mode == "cut":  # gone for every target: the same increase for each
                assert se[d] < 1e-6 and hi - lo < 1e-5 and lo - 1e-5 < inc[d] < hi + 1e-5
                continue
            assert lo < inc[d] < hi, (mode, d)  # shuffle, replace: per-target chance
            # a mean of 400 bounded values: the percentile interval is the normal one, to
            # within the resampling error of 2000 resamples (~5%) and the skew (~5%)
            assert (hi - lo) / 2 == pytest.approx(1.96 * se[d], rel=0.15), (mode, d)
        for d in (5, 8):  # never touched: no increase in any resample
            assert ci[d] == [0.0, 0.0], (mode, d)
        assert res["effective_ci"][mode] == [5, 5]
    lo, hi = res["loss_ci"]
    assert lo <= res["loss"] <= hi


class ReadBack(torch.nn.Module):
    """Next-token logits ``sum_k weight_k * onehot(x_{-k})``: reads the tokens k back."""

    def __init__(self, weights: dict[int, float], vocab: int):
        super().__init__()
        self.weights, self.vocab = weights, vocab
        self.p = torch.nn.Parameter(torch.zeros(1))

    def forward(self, tokens):
        logits = torch.zeros(*tokens.shape, self.vocab)
        for k, w in self.weights.items():
            if tokens.shape[1] >= k:
                logits[:, -1] += w * torch.nn.functional.one_hot(tokens[:, -k], self.vocab)

        class Out:
            pass

        out = Out()
        out.logits = logits
        return out


def test_context_probe_effective_interval_spans_a_borderline_distance():
    """Token t repeats t-2 (p 0.4) or t-3 (p 0.3); the model reads both. With the threshold
    set exactly at the increase at d=2, d=2 counts as used (not below), and about half the
    resamples fall below it: the interval is [2, 3] around the estimate 3."""
    V, n = 6, 4000
    g = torch.Generator().manual_seed(0)
    stream = torch.randint(0, V, (n,), generator=g)
    u = torch.rand(n, generator=g)
    for t in range(3, n):
        if u[t] < 0.4:
            stream[t] = stream[t - 2]
        elif u[t] < 0.7:
            stream[t] = stream[t - 3]
    model = ReadBack({2: 1.5, 3: 1.0}, V)
    kw = {"modes": ["cut"], "window": 8, "n_targets": 600}
    probe = context_usage(model, stream, [1, 2, 3, 4], **kw)
    inc = probe["increase"]["cut"]
    assert inc[1] > inc[2] > 0 and inc[3] == inc[4] == 0  # d >= 3 keeps what it reads
    res = context_usage(model, stream, [1, 2, 3, 4], **kw, bootstrap=400,
                        threshold=inc[2] / probe["loss"])  # fmt: skip
    assert res["effective"]["cut"] == 3 and res["effective_ci"]["cut"] == [2, 3]


@pytest.mark.parametrize("encoder", ["lstm", "transformer"])
def test_context_probe_decodes_the_last_position_only_with_the_same_result(encoder):
    """A LanguageModel is decoded at the target's position only; the probe's per-target
    numbers equal those of the whole model's logits (a wrapper that hides the encoder, so
    the probe must call it whole)."""
    from rnndrop.models import LanguageModel

    torch.manual_seed(0)
    lm = LanguageModel(vocab_size=50, embedding_size=16, hidden_size=16, num_layers=2,
                       encoder=encoder, num_heads=2, max_len=64)  # fmt: skip

    class Whole(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)

    stream = torch.randint(0, 50, (600,), generator=torch.Generator().manual_seed(1))
    kw = {"window": 24, "n_targets": 40, "batch_size": 16, "per_target": True}
    fast = context_usage(lm, stream, [1, 4, 12], **kw)["per_target"]
    whole = context_usage(Whole(lm), stream, [1, 4, 12], **kw)["per_target"]
    torch.testing.assert_close(fast["loss"], whole["loss"], rtol=0, atol=1e-5)
    for mode, per_d in whole["increase"].items():
        for d, inc in per_d.items():
            torch.testing.assert_close(fast["increase"][mode][d], inc, rtol=0, atol=1e-5)


def test_last_logits_of_a_subclass_that_overrides_forward_is_its_forwards():
    """The shortcut past the decoder's other positions must not skip a subclass's forward:
    one that shifts its logits gets its own forward's last position from last_logits and
    from the probe."""
    from rnndrop.analysis.context import _last_logits
    from rnndrop.models import LanguageModel

    class Shifted(LanguageModel):
        def forward(self, tokens, state=None):
            out = super().forward(tokens, state)
            return out._replace(logits=out.logits + torch.arange(out.logits.shape[-1]))

    torch.manual_seed(0)
    lm = Shifted(vocab_size=30, embedding_size=8, hidden_size=8).eval()
    x = torch.randint(0, 30, (4, 12))
    with torch.no_grad():
        torch.testing.assert_close(lm.last_logits(x), lm(x).logits[:, -1], rtol=0, atol=0)
        torch.testing.assert_close(_last_logits(lm, x), lm(x).logits[:, -1], rtol=0, atol=0)
        plain = LanguageModel.forward(lm, x).logits[:, -1]
    assert not torch.allclose(lm.last_logits(x), plain)


def test_context_probe_rejects_bad_bootstrap_settings():
    stream, model = periodic_stream(5, 0, 100), LagModel(5, 0)
    with pytest.raises(ValueError, match="bootstrap"):
        context_usage(model, stream, [1], window=10, bootstrap=-1)
    with pytest.raises(ValueError, match="threshold"):
        context_usage(model, stream, [1], window=10, threshold=1.5)


def _fake_probe(positions, loss, increase):
    return {"positions": positions, "loss": loss, "increase": {"cut": {1: increase}}}


def test_compare_probes_pairs_the_targets():
    n, g = 1000, torch.Generator().manual_seed(0)
    pos = torch.arange(n)
    base = torch.rand(n, generator=g, dtype=torch.double) * 3  # varies a lot across targets
    # a constant shift on every target: the paired interval is that shift exactly, however
    # much the targets themselves vary
    diff = compare_probes(_fake_probe(pos, base + 0.25, base + 0.1), _fake_probe(pos, base, base))
    assert diff["loss"] == pytest.approx([0.25] * 3)
    assert diff["increase"]["cut"][1] == pytest.approx([0.1] * 3)
    # a noisy difference: the percentile interval is mean +- 1.96 sd / sqrt(n) (to ~10%)
    noise = torch.randn(n, generator=g, dtype=torch.double)
    mean, lo, hi = compare_probes(_fake_probe(pos, base + noise, base),
                                  _fake_probe(pos, base, base), 2000)["loss"]  # fmt: skip
    assert mean == pytest.approx(float(noise.mean()))
    assert (hi - lo) / 2 == pytest.approx(1.96 * float(noise.std()) / n**0.5, rel=0.1)
    with pytest.raises(ValueError, match="different targets"):
        compare_probes(_fake_probe(pos, base, base), _fake_probe(pos + 1, base, base))


# --- the context study to convergence -------------------------------------------------------


def _config(tmp_path, text_corpus, **kw) -> dict:
    return {"name": "conv", "corpus": "folder", "data_dir": str(text_corpus),
            "schemes": ["none", "variational"], "rates": [0.2], "seeds": [0],
            "model": {"embedding_size": 8, "hidden_size": 8, "num_layers": 1}, "steps": 60,
            "batch_size": 4, "bptt": 6, "window": 12, "distances": [1, 3, 6],
            "n_targets": 30, "out_dir": str(tmp_path / "runs"), "lr": 0.05,
            "val_every": 10, "patience": 1, "plateau_factor": 0.5, "bootstrap": 50,
            **kw}  # fmt: skip


def test_context_study_trains_to_convergence_one_slice_at_a_time(tmp_path, text_corpus, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps(_config(tmp_path, text_corpus)))
    args = ["context", "--config", str(cfg), "--no-progress"]
    assert study_main([*args, "--only", "scheme=none"]) == 0
    out = capsys.readouterr().out
    assert "| none |" in out and "variational" not in out  # only the finished slice
    root = tmp_path / "runs" / "conv" / "folder"
    assert not (root / "variational_p0.2").exists()
    result = json.loads((root / "none" / "seed=0" / "result.json").read_text())
    t = result["training"]
    steps = [s for s, _, _ in t["history"]]
    assert steps == list(range(10, t["steps"] + 1, 10))
    losses = [v for _, v, _ in t["history"]]
    assert t["best_val_loss"] == min(losses) and t["best_step"] == steps[losses.index(min(losses))]
    # patience 1: a run stops at its first validation without a new best, or at the cap
    assert t["converged"] == (t["stopped_step"] is not None)
    assert t["converged"] == (losses[-1] > min(losses[:-1], default=math.inf))
    assert math.isfinite(t["test_loss"])
    for m, by_d in result["probe"]["ci"].items():
        for d, (lo, hi) in by_d.items():
            assert lo <= result["probe"]["increase"][m][d] + 1e-12 and lo <= hi, (m, d)
    # the second slice, then the report of both with the training columns
    assert study_main([*args, "--only", "scheme=variational"]) == 0
    out = capsys.readouterr().out
    assert "| none |" in out and "| variational_p0.2 |" in out and "best val ppl" in out
    assert "bootstrap intervals over the probed targets" in out
    # paired against none on the same targets, from each run's saved per-target probe
    assert "Paired against none" in out
    paired = out[out.index("Paired against none") :].splitlines()
    row = next(line for line in paired if line.startswith("| variational_p0.2 | "))
    mine = torch.load(root / "variational_p0.2" / "seed=0" / "targets.pt", weights_only=True)
    ref = torch.load(root / "none" / "seed=0" / "targets.pt", weights_only=True)
    assert torch.equal(mine["positions"], ref["positions"])
    assert f"{float((mine['loss'] - ref['loss']).mean()):+.3f}" in row.split("|")[2]
    assert (root / "none" / "seed=0" / "model.pt").is_file()
    assert study_main([*args, "--only", "distance=3"]) == 2  # no such key in this study
    assert "KEY one of ['rate', 'scheme', 'seed']" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("bad", "match"),
    [({"val_every": 0}, "needs validations"), ({"patience": 0}, "plateau_factor acts"),
     ({"plateau_factor": 0.0}, "plateau_factor"), ({"bootstrap": -1}, ">= 0"),
     ({"context_threshold": 2.0}, "context_threshold")],
)  # fmt: skip
def test_context_study_rejects_settings_that_make_no_sense(tmp_path, text_corpus, bad, match):
    with pytest.raises(ValueError, match=match):
        ContextStudyConfig(**_config(tmp_path, text_corpus, **bad))


def test_context_study_hash_holds_the_convergence_settings_only_when_set(tmp_path, text_corpus):
    base = {k: v for k, v in _config(tmp_path, text_corpus).items()
            if k not in ContextStudyConfig._LATER}  # fmt: skip
    run = Run("none", None, 0)
    plain = ContextStudyConfig(**base).cell_spec(run)
    assert not set(ContextStudyConfig._LATER) & set(plain)  # published hashes unchanged
    converged = ContextStudyConfig(**base, val_every=10, patience=2, bootstrap=9).cell_spec(run)
    assert {k: converged[k] for k in ("val_every", "patience", "bootstrap")} == {
        "val_every": 10, "patience": 2, "bootstrap": 9}  # fmt: skip


def test_context_study_names_a_missing_corpus_in_one_line(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({"corpus": "ptb", "data_dir": str(tmp_path / "nothing"),
                               "out_dir": str(tmp_path / "runs")}))  # fmt: skip
    assert study_main(["context", "--config", str(cfg), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "ptb.train.txt" in err and "Traceback" not in err


# --- a higher cap and a killed run lose nothing ---------------------------------------------


def _run(tmp_path, text_corpus, **kw):
    from rnndrop.study.context import load_context_study, run_context_study

    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps(_config(tmp_path, text_corpus, schemes=["variational"], **kw)))
    (result,) = run_context_study(load_context_study(cfg), progress=False)
    return result


def test_a_higher_cap_resumes_the_run_where_it_stopped(tmp_path, text_corpus):
    # patience 9: no stop on the plateau within these caps, so the first run ends at its cap
    first = _run(tmp_path, text_corpus, steps=30, patience=9)
    assert first["training"]["steps"] == 30 and not first["training"]["converged"]
    second = _run(tmp_path, text_corpus, steps=50, patience=9)
    t = second["training"]
    assert t["resumed_from_step"] == 30 and t["steps"] == 50
    # the validations before the old cap are the first run's, not redone
    assert t["history"][:3] == first["training"]["history"]
    assert [s for s, _, _ in t["history"]] == [10, 20, 30, 40, 50]
    assert second["config_hash"] != first["config_hash"]
    assert second["seconds"] > first["seconds"]  # counts the first run's time
    # the same as a run with the higher cap from the start, bit for bit (exact resume)
    (tmp_path / "straight").mkdir()
    straight = _run(tmp_path / "straight", text_corpus, steps=50, patience=9)
    assert "resumed_from_step" not in straight["training"]
    assert straight["training"]["history"] == t["history"]
    assert straight["probe"]["increase"] == second["probe"]["increase"]


def test_a_killed_run_resumes_from_its_checkpoint_with_the_same_result(tmp_path, text_corpus):
    first = _run(tmp_path, text_corpus, steps=30, patience=9)
    out = tmp_path / "runs" / "conv" / "folder" / "variational_p0.2" / "seed=0"
    (out / "result.json").unlink()  # killed after training, before the result was written
    again = _run(tmp_path, text_corpus, steps=30, patience=9)
    assert again["training"]["resumed_from_step"] == 30
    # the checkpoint's plateau state restores the best weights: the same model is probed
    assert again["training"]["best_step"] == first["training"]["best_step"]
    assert again["probe"]["increase"] == first["probe"]["increase"]
    assert again["probe"]["loss"] == first["probe"]["loss"]


def test_a_run_that_converged_below_its_cap_keeps_its_result_under_a_higher_cap(
    tmp_path, text_corpus
):
    first = _run(tmp_path, text_corpus, steps=200, lr=0.3, patience=1)  # overfits fast
    assert first["training"]["converged"] and first["training"]["steps"] < 200
    raised = _run(tmp_path, text_corpus, steps=400, lr=0.3, patience=1)
    assert raised["training"]["cap_raised_from"] == 200
    assert raised["probe"] == first["probe"] and raised["spec"]["steps"] == 400
    assert "resumed_from_step" not in raised["training"]


def test_a_run_that_stopped_on_its_plateau_at_its_cap_keeps_its_result_under_a_higher_cap(
    tmp_path, text_corpus
):
    """The plateau's stop falls on the cap's own step: converged, and a higher cap would have
    stopped it there too, so the result stands (resuming it would train on past its stop)."""
    free = _run(tmp_path, text_corpus, steps=200, lr=0.3, patience=1)
    stop = free["training"]["steps"]
    assert free["training"]["converged"] and stop < 200
    (tmp_path / "at_cap").mkdir()
    at_cap = _run(tmp_path / "at_cap", text_corpus, steps=stop, lr=0.3, patience=1)
    assert at_cap["training"]["converged"] and at_cap["training"]["steps"] == stop
    raised = _run(tmp_path / "at_cap", text_corpus, steps=400, lr=0.3, patience=1)
    assert raised["training"]["cap_raised_from"] == stop
    assert "resumed_from_step" not in raised["training"]
    assert raised["probe"] == at_cap["probe"] == free["probe"]


def test_other_settings_start_the_run_afresh(tmp_path, text_corpus):
    _run(tmp_path, text_corpus, steps=30, patience=9)
    other = _run(tmp_path, text_corpus, steps=50, patience=9, lr=0.01)
    assert "resumed_from_step" not in other["training"]
    assert [s for s, _, _ in other["training"]["history"]] == [10, 20, 30, 40, 50]


def test_a_checkpoint_of_a_run_with_other_settings_is_never_resumed(tmp_path, text_corpus):
    """A finished run A, then a run B with other settings started in the same folder: the
    checkpoint there is B's (run.json names it), so raising A's cap starts afresh, and B's
    fresh start removed A's checkpoint before writing its own."""
    from rnndrop.study.common import fresh_run_dir
    from rnndrop.study.context import RUN, _earlier_run, load_context_study

    _run(tmp_path, text_corpus, steps=30, patience=9)  # A
    out = tmp_path / "runs" / "conv" / "folder" / "variational_p0.2" / "seed=0"
    ckpt = out / "checkpoints" / "last_good.ckpt"
    assert ckpt.is_file()
    cfg = tmp_path / "c.yaml"
    a_higher = load_context_study(cfg, steps=50)  # c.yaml holds A's settings
    (cell,) = a_higher.cells()
    assert _earlier_run(out, a_higher.cell_spec(cell))["step"] == 30
    b = load_context_study(cfg, lr=0.01)
    (out / RUN).write_text(json.dumps({"spec": b.cell_spec(cell)}))  # B started
    assert _earlier_run(out, a_higher.cell_spec(cell)) is None  # the checkpoint is B's
    fresh_run_dir(out, progress=False)  # B starts afresh
    assert not ckpt.exists() and not list(out.glob("events.out.tfevents.*"))
    assert (out / "result.json").is_file()  # A's result stays until B writes its own


def test_the_steps_column_says_how_a_run_ended_and_how_far_its_rate_fell():
    from rnndrop.study.context import _steps_text

    capped = {"steps": 300, "converged": False, "best_step": 300,
              "history": [[100, 5.0, 0.002], [200, 4.9, 0.001], [300, 4.8, 0.0005]]}  # fmt: skip
    assert _steps_text(capped) == "300 (cap, best at 300, lr 0.002 → 0.0005)"
    flat = {**capped, "converged": True, "steps": 200, "best_step": 100,
            "history": [[100, 5.0, 0.002], [200, 5.1, 0.002]]}  # fmt: skip
    assert _steps_text(flat) == "200 (converged, best at 100)"
    assert _steps_text({"steps": 50}) == "50"
