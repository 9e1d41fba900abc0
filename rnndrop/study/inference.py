"""Test-time inference under each dropout scheme: weight scaling, MC arithmetic, MC geometric.

``rnndrop study inference --config experiments/inference/delayed_recall.yaml``: for every
scheme x rate x seed, train a small :class:`~rnndrop.models.SequenceModel` on a synthetic
classification task (or reuse the model a previous run saved, when everything that decides
the training is the same), then predict the held-out targets three ways:

- **weight scaling**: one deterministic forward (inverted dropout: every unit at its
  expectation);
- **MC arithmetic**: ``S`` passes with sampled masks, probabilities averaged (Gal &
  Ghahramani 2016);
- **MC geometric**: the same passes, log-probabilities averaged and renormalised (the
  estimate of the normalised geometric ensemble that weight scaling equals exactly for a
  single softmax layer; :func:`rnndrop.analysis.exact_ensemble`).

Each is scored on the targets that test memory (the task's ``memory_mask``) by accuracy, NLL,
ECE and Brier score (:mod:`rnndrop.analysis.calibration`). The convergence in ``S``: the
largest ``S`` draws are split into ``S_max // S`` disjoint groups of ``S``, each group
aggregated (:func:`rnndrop.analysis.mc_aggregate`) and scored, and the mean and spread over
groups reported for every ``S`` in ``sample_sizes``.

Runs live in ``runs/<name>/<task>/<scheme>/seed=<s>`` (``model.pt``, ``train.json``,
``result.json`` and a TensorBoard run with the training curves, the final scores as
``inference/*`` scalars, the convergence against ``S`` and a reliability diagram); the report
is ``inference.md``, ``inference.csv``, ``convergence.png`` and ``reliability.png`` under
``runs/<name>/<task>``, and a TensorBoard run ``summary``.

Learned dropout rates: after training, :func:`learned_rates` reads the rates of any
learnable-rate dropout (concrete dropout, Gal, Hron & Kendall 2017) from the model: its
``learned_rates()`` method if it has one, else parameters whose names contain ``rate`` or
``logit``. A scheme with such dropout (a ``custom_schemes`` entry) gets them in the report;
the built-in schemes have none.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor, nn

from .common import format_ci, fresh_run_dir, group_by, tensorboard_summary, write_json
from .config import BUILTIN_SCHEMES, check_model_settings, resolve_scheme, uses_rate

__all__ = [
    "METHODS",
    "InferenceCell",
    "InferenceStudyConfig",
    "collect_predictions",
    "evaluate_inference",
    "learned_rates",
    "load_inference_result",
    "load_inference_study",
    "run_inference_cell",
    "run_inference_study",
    "write_inference_report",
]

FORMAT = 1

#: The three predictions compared, in report order.
METHODS: tuple[str, ...] = ("weight_scaling", "mc_arithmetic", "mc_geometric")
_TITLES = {"weight_scaling": "weight scaling", "mc_arithmetic": "MC arithmetic",
           "mc_geometric": "MC geometric"}  # fmt: skip
_SCORES = ("acc", "nll", "ece", "brier")
_MIN_BIN = 20  # the report's reliability plot leaves out bins with fewer (pooled) targets
_TRAIN_KEYS = ("task", "task_args", "distance", "model", "steps", "batch_size", "optimizer",
               "lr", "gradient_clip_val", "val_every")  # fmt: skip


@dataclass(frozen=True)
class InferenceCell:
    scheme: str
    rate: float | None
    seed: int

    @property
    def label(self) -> str:
        return self.scheme if self.rate is None else f"{self.scheme}_p{self.rate:g}"

    def __str__(self) -> str:
        return f"{self.label} seed={self.seed}"


@dataclass
class InferenceStudyConfig:
    """Schemes x rates x seeds of sequence models on one synthetic classification task, each
    evaluated by weight scaling and by Monte Carlo with both aggregations.

    ``sample_sizes`` are the ``S`` of the convergence curve; the largest is the ``S`` of the
    MC rows of the tables. ``n_bins``: confidence bins for ECE and the reliability diagrams.
    ``threads``: torch's intra-op threads while the study runs; these models are too small to
    gain from more than one, and on a busy machine more threads spin (ten times slower
    measured on a loaded 2-core machine).
    """

    name: str = "inference"
    task: str = "delayed_recall"
    task_args: dict[str, Any] = field(default_factory=lambda: {"n_symbols": 4})
    distance: int = 10
    schemes: list[str] = field(default_factory=lambda: ["none", "naive", "variational"])
    rates: list[float] = field(default_factory=lambda: [0.25])
    seeds: list[int] = field(default_factory=lambda: [0])
    custom_schemes: dict[str, dict[str, Any]] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=lambda: {"hidden_size": 64, "embedding_size": 16})
    steps: int = 2000
    batch_size: int = 32
    optimizer: str = "adam"
    lr: float = 3e-3
    gradient_clip_val: float = 1.0
    val_every: int = 500
    eval_size: int = 512
    eval_batch_size: int = 256
    sample_sizes: list[int] = field(default_factory=lambda: [1, 2, 5, 10, 50])
    n_bins: int = 15
    threads: int | None = 1  # torch threads (None: torch's default); small models: one is best
    out_dir: str = "runs"

    def __post_init__(self) -> None:
        from ..data.synthetic import TASKS

        known = {**BUILTIN_SCHEMES, **self.custom_schemes}
        unknown = [s for s in self.schemes if s not in known]
        if unknown:
            raise ValueError(f"unknown scheme(s) {unknown}; built in: {sorted(BUILTIN_SCHEMES)}; "
                             "or define them under custom_schemes")  # fmt: skip
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {sorted(TASKS)}, got {self.task!r}")
        if TASKS[self.task].loss != "cross_entropy":
            raise ValueError(f"task {self.task!r} is a regression: the inference study needs "
                             "class probabilities (copy, delayed_recall, "
                             "associative_recall)")  # fmt: skip
        for name in ("distance", "steps", "batch_size", "val_every", "eval_size",
                     "eval_batch_size", "n_bins"):  # fmt: skip
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ValueError(f"threads must be an integer >= 1 or null, got {self.threads!r}")
        sizes = self.sample_sizes
        if not sizes or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in sizes):
            raise ValueError(f"sample_sizes must be integers >= 1, got {sizes}")
        self.sample_sizes = sorted(set(sizes))
        if not self.seeds:
            raise ValueError("seeds: give at least one seed")
        for s in self.schemes:
            for p in self.rates_for(s):
                try:
                    resolve_scheme(self.scheme_spec(s), p)
                except (ValueError, TypeError) as err:
                    raise ValueError(f"scheme {s!r}: {err}") from err
        check_model_settings(self.model, "model")

    @property
    def mc_samples(self) -> int:
        return max(self.sample_sizes)

    def scheme_spec(self, scheme: str) -> dict[str, Any]:
        return self.custom_schemes.get(scheme) or BUILTIN_SCHEMES[scheme]

    def rates_for(self, scheme: str) -> list[float | None]:
        return list(self.rates) if uses_rate(self.scheme_spec(scheme)) else [None]

    def cells(self) -> list[InferenceCell]:
        return [InferenceCell(s, p, seed) for s in self.schemes for p in self.rates_for(s)
                for seed in self.seeds]  # fmt: skip

    @property
    def root(self) -> Path:
        return Path(self.out_dir) / self.name / self.task

    def cell_dir(self, cell: InferenceCell) -> Path:
        return self.root / cell.label / f"seed={cell.seed}"

    def train_spec(self, cell: InferenceCell) -> dict[str, Any]:
        """Everything that decides the trained model (hashed: a saved model is reused when
        only the evaluation settings change)."""
        encoder, dropout = resolve_scheme(self.scheme_spec(cell.scheme), cell.rate)
        model = {**self.model, **self.scheme_spec(cell.scheme).get("model", {})}
        train = {k: getattr(self, k) for k in _TRAIN_KEYS}
        return {**train, "model": model, "format": FORMAT, "scheme": cell.scheme,
                "rate": cell.rate, "seed": cell.seed, "encoder": encoder,
                "dropout": dropout.to_dict()}  # fmt: skip

    def cell_spec(self, cell: InferenceCell) -> dict[str, Any]:
        evaluation = {k: getattr(self, k) for k in ("eval_size", "sample_sizes", "n_bins")}
        return {**self.train_spec(cell), "eval": evaluation}

    def train_hash(self, cell: InferenceCell) -> str:
        return _hash(self.train_spec(cell))

    def cell_hash(self, cell: InferenceCell) -> str:
        return _hash(self.cell_spec(cell))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _hash(spec: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:12]


def load_inference_study(path: str | Path | None = None, **overrides: Any) -> InferenceStudyConfig:
    """A study from a YAML file (keys as :class:`InferenceStudyConfig`'s fields) + overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"study config {path} does not exist")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of study settings, got {type(data)}")
    data.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in dataclasses.fields(InferenceStudyConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown inference-study setting(s) {unknown}; valid: {sorted(known)}")
    return InferenceStudyConfig(**data)


def load_inference_result(
    study: InferenceStudyConfig, cell: InferenceCell
) -> dict[str, Any] | None:
    """The run's saved result if it exists for exactly this configuration (same hash)."""
    try:
        r = json.loads((study.cell_dir(cell) / "result.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return r if r.get("config_hash") == study.cell_hash(cell) else None


# ---- evaluation -----------------------------------------------------------------------------


@torch.no_grad()
def collect_predictions(
    model: nn.Module, loader, samples: int, *, task: Any = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Deterministic and ``samples`` Monte Carlo logits on the scored targets of ``loader``.

    The scored targets are those the task's ``memory_mask`` selects (else every target that
    is not -100). The model is put in eval mode (restored after); MC passes sample every
    rnndrop dropout site (:func:`rnndrop.nn.mc_dropout`).

    Returns:
        ``(scaled, sampled, target)``: logits ``(N, C)``, ``(S, N, C)`` and classes ``(N,)``,
        float32 on the CPU.
    """
    from ..nn import mc_dropout

    was = model.training
    model.eval()
    det, mc, targets = [], [], []
    device = next(model.parameters()).device
    try:
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            scored = task.memory_mask(y) if hasattr(task, "memory_mask") else y != -100
            det.append(model(x).prediction.float()[scored].cpu())
            with mc_dropout(model):
                mc.append(torch.stack([model(x).prediction.float()[scored].cpu()
                                       for _ in range(samples)]))  # fmt: skip
            targets.append(y[scored].cpu())
    finally:
        model.train(was)
    return torch.cat(det), torch.cat(mc, 1), torch.cat(targets)


def _scores(logp: Tensor, target: Tensor, n_bins: int, bins: dict | None = None):
    """Scores of one prediction; with ``bins``, its reliability bins go in there too."""
    from ..analysis.calibration import Calibration

    metric = Calibration(n_bins=n_bins)
    metric.update(logp, target, log=True)
    m = {k: float(v) for k, v in metric.compute().items()}
    if bins is not None:
        rel = metric.reliability()
        bins.update(count=rel.count.tolist(),
                    confidence_sum=(rel.confidence.nan_to_num() * rel.count).tolist(),
                    correct_sum=(rel.accuracy.nan_to_num() * rel.count).tolist())  # fmt: skip
    return {k: m[k] for k in (*_SCORES, "mce", "confidence")}


def evaluate_inference(
    scaled: Tensor,
    sampled: Tensor,
    target: Tensor,
    *,
    sample_sizes: Sequence[int] = (1, 2, 5, 10, 50),
    n_bins: int = 15,
) -> dict[str, Any]:
    """Score weight scaling, MC arithmetic and MC geometric on the same targets.

    Args:
        scaled: deterministic logits ``(N, C)``.
        sampled: Monte Carlo logits ``(S_max, N, C)``, ``S_max >= max(sample_sizes)``.
        target: classes ``(N,)``.
        sample_sizes: the ``S`` of the convergence curve.
        n_bins: ECE bins.

    Returns:
        ``{"methods": {method: {acc, nll, ece, brier, mce, confidence}}, "convergence":
        {aggregate: {S: {score: [mean, std over groups, groups]}}}, "mc_samples": S_max,
        "targets": N, "bins": {method: {count, confidence_sum, correct_sum}}}`` (the
        reliability bins, which pool over runs by adding). The MC methods aggregate the
        first ``max(sample_sizes)`` draws; the convergence at ``S`` splits those into
        ``S_max // S`` disjoint groups.
    """
    from ..analysis import mc_aggregate

    s_max = max(sample_sizes)
    if sampled.shape[0] < s_max:
        raise ValueError(f"{sampled.shape[0]} MC samples given, sample_sizes needs {s_max}")
    sampled = sampled[:s_max]
    bins: dict[str, dict[str, list[float]]] = {m: {} for m in METHODS}
    methods = {"weight_scaling": _scores(scaled.float().log_softmax(-1), target, n_bins,
                                         bins["weight_scaling"])}  # fmt: skip
    for agg in ("arithmetic", "geometric"):
        logp = mc_aggregate(sampled, agg, log=True)
        methods[f"mc_{agg}"] = _scores(logp, target, n_bins, bins[f"mc_{agg}"])
    convergence: dict[str, dict[int, dict[str, list[float]]]] = {}
    for agg in ("arithmetic", "geometric"):
        curve = {}
        for s in sample_sizes:
            groups = [_scores(mc_aggregate(sampled[g * s : (g + 1) * s], agg, log=True), target,
                              n_bins) for g in range(s_max // s)]  # fmt: skip
            curve[int(s)] = {k: _mean_std([g[k] for g in groups]) for k in _SCORES}
        convergence[agg] = curve
    return {"methods": methods, "convergence": convergence, "mc_samples": s_max,
            "targets": int(target.numel()), "bins": bins}  # fmt: skip


def _mean_std(values: list[float]) -> list[float]:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else math.nan
    return [mean, std, float(n)]


def learned_rates(model: nn.Module) -> dict[str, float]:
    """Learned dropout rates of ``model`` (concrete dropout), ``{}`` when it has none.

    A module's ``learned_rates()`` (a mapping of site to rate) is used where one exists; else
    every parameter whose name contains ``rate`` (its mean) or ``logit`` (the sigmoid of its
    mean) is read as a rate.
    """
    out: dict[str, float] = {}
    for prefix, module in model.named_modules():
        fn = getattr(module, "learned_rates", None)
        if callable(fn) and module is not model:
            for site, value in dict(fn()).items():
                key = f"{prefix}.{site}" if prefix else str(site)
                out[key] = float(torch.as_tensor(value).float().mean())
    if out:
        return out
    for name, p in model.named_parameters():
        low = name.lower()
        if "logit" in low:
            out[name] = float(torch.sigmoid(p.detach().float().mean()))
        elif "rate" in low:
            out[name] = float(p.detach().float().mean())
    return out


# ---- running --------------------------------------------------------------------------------


def _train(study: InferenceStudyConfig, cell: InferenceCell, dm, logger, progress: bool):
    """Train the cell's model, or load the one a previous run saved for the same training."""
    import lightning as L

    from ..lit import NaNGuard, NonFiniteLossError, SequenceTask
    from ..models import RECURRENT_CELLS, SequenceModel

    out = study.cell_dir(cell)
    spec = study.train_spec(cell)
    encoder = spec["encoder"]
    _, dropout = resolve_scheme(study.scheme_spec(cell.scheme), cell.rate)
    kind = {"dropout": dropout} if encoder in RECURRENT_CELLS else {"transformer_dropout": dropout}
    L.seed_everything(cell.seed, verbose=False)
    model = SequenceModel(dm.input_kind, vocab_size=dm.vocab_size, input_size=dm.input_size,
                          output_size=dm.output_size, target=dm.target, encoder=encoder,
                          **kind, **spec["model"])  # fmt: skip
    try:
        saved = json.loads((out / "train.json").read_text())
    except (OSError, json.JSONDecodeError):
        saved = {}
    if saved.get("train_hash") == study.train_hash(cell) and (out / "model.pt").is_file():
        model.load_state_dict(torch.load(out / "model.pt", weights_only=True))
        return model, saved, True
    fresh_run_dir(out, progress)
    start = time.perf_counter()
    # no diagram per validation: the study draws its own from the final predictions
    task = SequenceTask(model, loss=dm.loss, baseline_loss=dm.baseline_loss,
                        optimizer=study.optimizer, lr=study.lr,
                        reliability_diagrams=False)  # fmt: skip
    trainer = L.Trainer(
        max_steps=study.steps, max_epochs=1, val_check_interval=min(study.val_every, study.steps),
        logger=logger, enable_checkpointing=False, gradient_clip_val=study.gradient_clip_val,
        enable_progress_bar=progress, enable_model_summary=False, num_sanity_val_steps=0,
        callbacks=[NaNGuard(save_every_n_steps=0)], default_root_dir=str(out),
        log_every_n_steps=max(1, min(50, study.steps // 30)),
    )  # fmt: skip
    status = "ok"
    try:
        trainer.fit(task, dm)
    except NonFiniteLossError as err:
        status = f"diverged: {err}"
    info = {"train_hash": study.train_hash(cell), "spec": spec, "status": status,
            "seconds": time.perf_counter() - start}  # fmt: skip
    if status == "ok":
        torch.save(model.state_dict(), out / "model.pt")
    write_json(out / "train.json", info)
    return model, info, False


def run_inference_cell(
    study: InferenceStudyConfig, cell: InferenceCell, progress: bool = False
) -> dict[str, Any]:
    """Train (or reuse) one model and compare its test-time inferences; write ``result.json``."""
    from lightning.pytorch.loggers import TensorBoardLogger

    from ..data import SyntheticDataModule

    start = time.perf_counter()
    out = study.cell_dir(cell)
    out.mkdir(parents=True, exist_ok=True)
    dm = SyntheticDataModule(
        study.task, study.distance, study.task_args, train_size=study.steps * study.batch_size,
        val_size=study.eval_size, test_size=study.eval_size, batch_size=study.batch_size,
        eval_batch_size=study.eval_batch_size, seed=cell.seed,
    )  # fmt: skip
    logger = TensorBoardLogger(str(out), name="", version="", default_hp_metric=False)
    model, info, reused = _train(study, cell, dm, logger, progress)
    evaluation: dict[str, Any] = {}
    rates: dict[str, float] = {}
    if info["status"] == "ok":
        torch.manual_seed(cell.seed)  # the MC draws, reproducible
        scaled, sampled, target = collect_predictions(model, dm.test_dataloader(),
                                                      study.mc_samples, task=dm.task)  # fmt: skip
        evaluation = evaluate_inference(scaled, sampled, target, sample_sizes=study.sample_sizes,
                                        n_bins=study.n_bins)  # fmt: skip
        rates = learned_rates(model)
        _log_cell(logger, study, cell, evaluation, rates, scaled, sampled, target)
    result = {
        "cell": {"scheme": cell.scheme, "rate": cell.rate, "seed": cell.seed,
                 "label": cell.label},
        "config_hash": study.cell_hash(cell), "train_hash": study.train_hash(cell),
        "spec": study.cell_spec(cell), "status": info["status"], "reused_model": reused,
        "train_seconds": info.get("seconds", math.nan), "evaluation": evaluation,
        "learned_rates": rates, "chance": 1.0 / dm.output_size,
        "seconds": time.perf_counter() - start,
    }  # fmt: skip
    write_json(out / "result.json", result)
    return result


def _log_cell(logger, study, cell, evaluation, rates, scaled, sampled, target) -> None:
    """Final scores, the convergence in S and a reliability diagram, to the cell's TensorBoard."""
    from ..analysis import Calibration, mc_aggregate, reliability_diagram

    w = logger.experiment
    for method, scores in evaluation["methods"].items():
        for k in _SCORES:
            w.add_scalar(f"inference/{method}/{k}", scores[k], global_step=study.steps)
    for agg, curve in evaluation["convergence"].items():
        for s, scores in curve.items():
            for k in ("acc", "nll"):
                w.add_scalar(f"inference_convergence/mc_{agg}_{k}", scores[k][0], global_step=s)
    for site, rate in rates.items():
        w.add_scalar(f"inference/learned_rate/{site}", rate, global_step=study.steps)
    bins = {}
    draws = sampled[: study.mc_samples]
    preds = {"weight scaling": scaled.float().log_softmax(-1),
             "MC arithmetic": mc_aggregate(draws, "arithmetic", log=True),
             "MC geometric": mc_aggregate(draws, "geometric", log=True)}  # fmt: skip
    for name, logp in preds.items():
        m = Calibration(n_bins=study.n_bins)
        m.update(logp, target, log=True)
        bins[name] = m.reliability()
    fig = reliability_diagram(bins, title=str(cell))
    w.add_figure("inference/reliability", fig, global_step=study.steps)  # closes the figure
    hp = {"scheme": cell.scheme, "rate": cell.rate or 0.0, "seed": cell.seed}
    final = {f"final/{m}_{k}": v[k] for m, v in evaluation["methods"].items() for k in _SCORES}
    logger.log_hyperparams(hp, final)
    w.flush()


def run_inference_study(study: InferenceStudyConfig, progress: bool = True) -> list[dict[str, Any]]:
    """Run every unfinished cell in this process; return all finished results."""
    from tqdm.auto import tqdm

    cells = study.cells()
    todo = [c for c in cells if load_inference_result(study, c) is None]
    print(f"inference study {study.name}: {len(cells)} runs, {len(todo)} to run; results under "
          f"{study.root}", file=sys.stderr, flush=True)  # fmt: skip
    bar = tqdm(total=len(todo), desc=study.name, unit="run", disable=not progress or not todo)
    threads = torch.get_num_threads()
    if study.threads is not None:
        torch.set_num_threads(study.threads)
    try:
        for cell in todo:
            r = run_inference_cell(study, cell, progress=progress)
            bar.write(_summary_line(r), file=sys.stderr)
            bar.update()
    finally:
        torch.set_num_threads(threads)
        bar.close()
    return [r for c in cells if (r := load_inference_result(study, c)) is not None]


def _summary_line(r: dict[str, Any]) -> str:
    c = r["cell"]
    if r["status"] != "ok":
        return f"{c['label']} seed={c['seed']}: {r['status'][:80]}"
    m = r["evaluation"]["methods"]
    parts = ", ".join(f"{_TITLES[k]} acc {m[k]['acc']:.3f} nll {m[k]['nll']:.3f}"
                      for k in METHODS)  # fmt: skip
    how = "reused model" if r["reused_model"] else f"trained in {r['train_seconds']:.0f} s"
    return f"{c['label']} seed={c['seed']}: {parts} ({how}, {r['seconds']:.0f} s)"


# ---- the report -----------------------------------------------------------------------------


def _ci(values: list[float], digits: int) -> str:
    from ..analysis import mean_ci

    return format_ci(*mean_ci(values), digits=digits)


def write_inference_report(
    study: InferenceStudyConfig, results: list[dict[str, Any]]
) -> dict[str, Path]:
    """``inference.md``, ``inference.csv``, ``convergence.png``, ``reliability.png`` and a
    TensorBoard summary under the study's root."""
    import csv

    root = study.root
    root.mkdir(parents=True, exist_ok=True)
    ok = [r for r in results if r["status"] == "ok"]
    labels = list(dict.fromkeys(r["cell"]["label"] for r in ok))
    by_label = group_by(ok, lambda r: r["cell"]["label"])
    s_max = study.mc_samples
    paths = {"markdown": root / "inference.md", "csv": root / "inference.csv"}

    with paths["csv"].open("w", newline="") as f:
        cols = ["label", "scheme", "rate", "seed", "config_hash", "method", "samples", *_SCORES]
        writer = csv.DictWriter(f, fieldnames=cols)
        writer.writeheader()
        for r in ok:
            base = {"label": r["cell"]["label"], "scheme": r["cell"]["scheme"],
                    "rate": r["cell"]["rate"], "seed": r["cell"]["seed"],
                    "config_hash": r["config_hash"]}  # fmt: skip
            ev = r["evaluation"]
            for method, scores in ev["methods"].items():
                samples = 1 if method == "weight_scaling" else ev["mc_samples"]
                writer.writerow({**base, "method": method, "samples": samples,
                                 **{k: scores[k] for k in _SCORES}})  # fmt: skip
            for agg, curve in ev["convergence"].items():
                for s, scores in curve.items():
                    writer.writerow({**base, "method": f"mc_{agg}_groups", "samples": s,
                                     **{k: scores[k][0] for k in _SCORES}})  # fmt: skip

    def col(label: str, method: str, key: str) -> list[float]:
        return [r["evaluation"]["methods"][method][key] for r in by_label[label]]

    seeds = sorted({r["cell"]["seed"] for r in ok})
    n_targets = sorted({r["evaluation"]["targets"] for r in ok})
    lines = [
        f"# {study.name}: test-time inference on {study.task} (d = {study.distance})", "",
        f"{len(ok)} runs ({len(labels)} schemes x {len(seeds)} seed(s)); {study.steps} Adam "
        f"steps of {study.batch_size} per run; model {study.model}; scored on "
        f"{', '.join(map(str, n_targets))} held-out targets (where the task tests memory). "
        f"Weight scaling: one deterministic pass. MC: {s_max} passes with sampled masks, "
        "probabilities averaged (arithmetic) or log-probabilities averaged and renormalised "
        f"(geometric). ECE: {study.n_bins} equal-width bins of top-1 confidence. Mean ± 95% "
        "interval over seeds (Student t).", "",
        "Accuracy and NLL (nats):", "",
        "| scheme | acc WS | acc MC-arith | acc MC-geo | NLL WS | NLL MC-arith | NLL MC-geo |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]  # fmt: skip
    for label in labels:
        accs = [_ci(col(label, m, "acc"), 3) for m in METHODS]
        nlls = [_ci(col(label, m, "nll"), 3) for m in METHODS]
        lines.append(f"| {label} | " + " | ".join(accs + nlls) + " |")
    lines += ["", "Calibration: ECE and Brier score (lower is better), and the mean top-1 "
              "confidence minus accuracy (> 0: overconfident, < 0: underconfident):", "",
              "| scheme | ECE WS | ECE MC-arith | ECE MC-geo | Brier WS | Brier MC-arith | "
              "Brier MC-geo | conf. − acc WS | conf. − acc MC-arith |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for label in labels:
        eces = [_ci(col(label, m, "ece"), 3) for m in METHODS]
        briers = [_ci(col(label, m, "brier"), 3) for m in METHODS]
        over = []
        for m in ("weight_scaling", "mc_arithmetic"):
            gaps = [a - b for a, b in zip(col(label, m, "confidence"), col(label, m, "acc"),
                                          strict=True)]  # fmt: skip
            over.append(_ci(gaps, 3))
        lines.append(f"| {label} | " + " | ".join([*eces, *briers, *over]) + " |")
    sizes = study.sample_sizes
    for agg in ("arithmetic", "geometric"):
        lines += ["", f"Convergence in S, MC {agg}: NLL (nats) of S-sample estimates, mean over "
                  f"the {s_max} // S disjoint groups of the {s_max} draws and over seeds "
                  "(weight scaling for reference):", "",
                  "| scheme | WS | " + " | ".join(f"S={s}" for s in sizes) + " |",
                  "|---|---:|" + "---:|" * len(sizes)]  # fmt: skip
        for label in labels:
            vals = [_ci([_curve(r, agg, s, "nll") for r in by_label[label]], 3) for s in sizes]
            ws = _ci(col(label, "weight_scaling", "nll"), 3)
            lines.append(f"| {label} | {ws} | " + " | ".join(vals) + " |")
    lines += ["", "Convergence in S, MC arithmetic: accuracy:", "",
              "| scheme | WS | " + " | ".join(f"S={s}" for s in sizes) + " |",
              "|---|---:|" + "---:|" * len(sizes)]  # fmt: skip
    for label in labels:
        vals = [_ci([_curve(r, "arithmetic", s, "acc") for r in by_label[label]], 3) for s in sizes]
        ws = _ci(col(label, "weight_scaling", "acc"), 3)
        lines.append(f"| {label} | {ws} | " + " | ".join(vals) + " |")
    rated = [r for r in ok if r["learned_rates"]]
    if rated:
        lines += ["", "Learned dropout rates (concrete dropout), mean over seeds:", "",
                  "| scheme | site | rate |", "|---|---|---:|"]  # fmt: skip
        for label, group in group_by(rated, lambda r: r["cell"]["label"]).items():
            for site in group[0]["learned_rates"]:
                vals = [r["learned_rates"].get(site, math.nan) for r in group]
                lines.append(f"| {label} | {site} | {_ci(vals, 3)} |")
    else:
        lines += ["", "Learned dropout rates: none of these schemes learns its rates."]
    failed = [r for r in results if r["status"] != "ok"]
    if failed:
        lines += ["", "Failed runs: " + "; ".join(f"{r['cell']['label']} seed="
                  f"{r['cell']['seed']}: {r['status'][:60]}" for r in failed)]  # fmt: skip
    md = "\n".join(lines) + "\n"
    paths["markdown"].write_text(md)
    if ok:
        paths.update(_plots(study, root, labels, by_label))
    tensorboard_summary(root, paths, md, images=("convergence_png", "reliability_png"))
    return paths


def _curve(r: dict[str, Any], agg: str, s: int, key: str) -> float:
    curve = r["evaluation"]["convergence"][agg]
    return (curve[str(s)] if str(s) in curve else curve[s])[key][0]


def _plots(study, root: Path, labels, by_label) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..analysis import mean_ci

    paths = {}
    sizes = study.sample_sizes
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, label in enumerate(labels):
        color = colors[i % len(colors)]
        group = by_label[label]
        for ax, key in zip(axes, ("nll", "acc"), strict=True):
            for agg, ls in (("arithmetic", "-"), ("geometric", "--")):
                ys = [mean_ci([_curve(r, agg, s, key) for r in group])[0] for s in sizes]
                ax.plot(sizes, ys, ls=ls, marker="o", ms=3, color=color,
                        label=label if agg == "arithmetic" else None)  # fmt: skip
            ws = mean_ci([r["evaluation"]["methods"]["weight_scaling"][key] for r in group])[0]
            ax.axhline(ws, color=color, ls=":", lw=1)
    for ax, name in zip(axes, ("NLL (nats)", "accuracy"), strict=True):
        ax.set_xscale("log")
        ax.set_xlabel("MC samples S")
        ax.set_ylabel(name)
    axes[0].set_title("solid: MC arithmetic, dashed: geometric, dotted: WS", fontsize=8)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    paths["convergence_png"] = root / "convergence.png"
    fig.savefig(paths["convergence_png"], dpi=110)
    plt.close(fig)

    n = len(labels)
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols, 3.1 * rows), squeeze=False)
    for ax, label in zip(axes.flat, labels, strict=False):
        ax.plot([0, 1], [0, 1], color="0.6", ls="--", lw=1)
        for method in ("weight_scaling", "mc_arithmetic"):
            rel = _pooled_bins(by_label[label], method)
            if rel is None:
                continue
            shown = rel.count >= _MIN_BIN  # a bin of a few targets is noise, not a trend
            ece = _ci([r["evaluation"]["methods"][method]["ece"] for r in by_label[label]], 3)
            ax.plot(rel.confidence[shown], rel.accuracy[shown], marker="o", ms=3,
                    label=f"{_TITLES[method]} (ECE {ece})")  # fmt: skip
        ax.set_title(f"{label} (bins of >= {_MIN_BIN} targets)", fontsize=8)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence", fontsize=8)
        ax.set_ylabel("accuracy", fontsize=8)
        ax.legend(fontsize=6, loc="upper left")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    paths["reliability_png"] = root / "reliability.png"
    fig.savefig(paths["reliability_png"], dpi=110)
    plt.close(fig)
    return paths


def _pooled_bins(group: list[dict[str, Any]], method: str):
    """The reliability bins of one method, pooled over the seeds' runs."""
    from ..analysis import Reliability

    count = conf = correct = None
    for r in group:
        b = r["evaluation"].get("bins", {}).get(method)
        if b is None:
            return None
        c = torch.tensor(b["count"], dtype=torch.float64)
        count = c if count is None else count + c
        cs = torch.tensor(b["confidence_sum"], dtype=torch.float64)
        conf = cs if conf is None else conf + cs
        k = torch.tensor(b["correct_sum"], dtype=torch.float64)
        correct = k if correct is None else correct + k
    if count is None:
        return None
    edges = torch.linspace(0, 1, len(count) + 1, dtype=torch.float64)
    safe = count.clamp_min(1)
    nan = torch.full_like(count, math.nan)
    return Reliability(edges, count, torch.where(count > 0, conf / safe, nan),
                       torch.where(count > 0, correct / safe, nan))  # fmt: skip
