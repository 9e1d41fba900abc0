"""Calibration of predictive distributions: expected calibration error, NLL, Brier score.

A prediction is *calibrated* when, among the targets predicted with top-1 confidence ``c``,
a fraction ``c`` is right (Guo et al. 2017). Three scores, each for deterministic and Monte
Carlo predictions alike (any ``(*, C)`` distribution and its ``(*)`` targets):

- **ECE**, expected calibration error: top-1 confidences in ``n_bins`` equal-width bins;
  ``Σ_b (n_b / N) |acc_b - conf_b|``. The multiclass (top-1) form, so a language model's
  vocabulary of any size reduces to one confidence per token. Binning is exactly
  torchmetrics' ``multiclass_calibration_error(norm="l1")`` (bins ``[k/n, (k+1)/n)``,
  confidence 1.0 in a bin of its own), kept here as per-bin sums so that memory does not grow
  with the number of targets and so the reliability diagram comes from the same bins;
- **NLL**: ``-log p_y``, mean over targets (nats);
- **Brier score**: ``Σ_c (p_c - [c = y])²`` over the full distribution, mean over targets, in
  [0, 2]; computed as ``Σ_c p_c² - 2 p_y + 1``, never materialising a one-hot.

:class:`Calibration` is a torchmetrics :class:`~torchmetrics.Metric` (sum states: it moves
with its module, resets, and syncs across processes like any metric);
:func:`calibration_metrics` is the one-call form; :func:`reliability_diagram` draws the bins
(matplotlib, imported when called). :class:`SplitCalibration` holds one metric per split and
kind (``""`` deterministic, ``"mc"`` Monte Carlo) for the Lightning tasks' ``val/ece``,
``val/ece_mc``, ... logs. Nothing here imports Lightning.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torchmetrics import Metric

__all__ = [
    "DEFAULT_BINS",
    "Calibration",
    "Reliability",
    "SplitCalibration",
    "calibration_metrics",
    "reliability_diagram",
]

#: Equal-width confidence bins (Guo et al. 2017 use 15).
DEFAULT_BINS = 15


class Reliability(NamedTuple):
    """Per-bin statistics of top-1 confidence, ``n_bins`` bins over [0, 1].

    Attributes:
        edges: ``(n_bins + 1,)`` bin edges.
        count: ``(n_bins,)`` targets per bin.
        confidence: ``(n_bins,)`` mean top-1 confidence in each bin (NaN where empty).
        accuracy: ``(n_bins,)`` fraction right in each bin (NaN where empty).
    """

    edges: Tensor
    count: Tensor
    confidence: Tensor
    accuracy: Tensor


class Calibration(Metric):
    r"""Accumulates ECE, MCE, NLL, Brier score and accuracy over batches of predictions.

    Args:
        n_bins: equal-width confidence bins for ECE and the reliability diagram.
        ignore_index: targets with this value are skipped (the tasks' padding, -100).

    ``update(preds, target, log=False)``: ``preds`` are probabilities ``(*, C)`` (rows summing
    to 1), or log-probabilities with ``log=True`` (better for NLL: no ``log`` of an underflowed
    probability); ``target`` class indices ``(*)``. Sums are kept in float64.

    ``compute()`` returns ``{"ece", "mce", "nll", "brier", "acc", "confidence", "count"}``
    (``mce``: the largest bin gap, torchmetrics' ``norm="max"``; ``confidence``: mean top-1
    confidence, so ``confidence - acc`` is the overconfidence). :meth:`reliability` gives the
    bins.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = False

    def __init__(self, n_bins: int = DEFAULT_BINS, ignore_index: int | None = -100, **kw: Any):
        super().__init__(**kw)
        if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
            raise ValueError(f"n_bins must be an integer >= 1, got {n_bins!r}")
        self.n_bins, self.ignore_index = n_bins, ignore_index
        f64 = torch.float64
        # slot n_bins holds confidence exactly 1.0 (torchmetrics' bucketize convention)
        for name in ("bin_count", "bin_confidence", "bin_correct"):
            self.add_state(name, torch.zeros(n_bins + 1, dtype=f64), dist_reduce_fx="sum")
        for name in ("nll_sum", "brier_sum", "total"):
            self.add_state(name, torch.zeros((), dtype=f64), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor, log: bool = False) -> None:  # type: ignore[override]
        if preds.shape[:-1] != target.shape:
            raise ValueError(
                f"Calibration: preds {tuple(preds.shape)} must be target's shape "
                f"{tuple(target.shape)} plus a class dimension"
            )
        preds = preds.detach().reshape(-1, preds.shape[-1])
        target = target.detach().reshape(-1)
        if self.ignore_index is not None:
            keep = target != self.ignore_index
            if not bool(keep.all()):
                preds, target = preds[keep], target[keep]
        if target.numel() == 0:
            return
        preds = preds.to(torch.promote_types(preds.dtype, torch.float32))
        if log:
            logp = preds
            probs = preds.exp()
            logp_y = logp.gather(1, target[:, None]).squeeze(1)
        else:
            probs = preds
            logp_y = None
        p_y = probs.gather(1, target[:, None]).squeeze(1)
        if logp_y is None:
            logp_y = p_y.clamp_min(torch.finfo(p_y.dtype).tiny).log()
        confidence, predicted = probs.max(1)
        correct = (predicted == target).to(confidence.dtype)
        edges = torch.linspace(0, 1, self.n_bins + 1, dtype=confidence.dtype,
                               device=confidence.device)  # fmt: skip
        index = torch.bucketize(confidence, edges, right=True) - 1
        index = index.clamp(0, self.n_bins)  # rounding above 1.0 joins the 1.0 slot
        f64 = torch.float64
        self.bin_count.scatter_add_(0, index, torch.ones_like(confidence, dtype=f64))
        self.bin_confidence.scatter_add_(0, index, confidence.to(f64))
        self.bin_correct.scatter_add_(0, index, correct.to(f64))
        self.nll_sum -= logp_y.to(f64).sum()
        sq = torch.linalg.vector_norm(probs, 2, dim=1).square()  # Σ_c p_c², no one-hot
        self.brier_sum += (sq - 2 * p_y + 1).to(f64).sum()
        self.total += target.numel()

    def compute(self) -> dict[str, Tensor]:  # type: ignore[override]
        n = self.total
        gap = (self.bin_correct - self.bin_confidence).abs()
        nonempty = self.bin_count > 0
        per_bin = torch.where(nonempty, gap / self.bin_count.clamp_min(1), torch.zeros_like(gap))
        nan = torch.tensor(float("nan"), dtype=torch.float64, device=n.device)
        if n == 0:
            return dict.fromkeys(("ece", "mce", "nll", "brier", "acc", "confidence"), nan) | {
                "count": n
            }
        return {
            "ece": gap.sum() / n,
            "mce": per_bin.max(),
            "nll": self.nll_sum / n,
            "brier": self.brier_sum / n,
            "acc": self.bin_correct.sum() / n,
            "confidence": self.bin_confidence.sum() / n,
            "count": n,
        }

    def reliability(self) -> Reliability:
        """The ``n_bins`` bins (confidence 1.0 counted in the last), on the CPU."""
        count = self.bin_count.detach().cpu().clone()
        conf = self.bin_confidence.detach().cpu().clone()
        correct = self.bin_correct.detach().cpu().clone()
        for t in (count, conf, correct):
            t[-2] += t[-1]
        count, conf, correct = count[:-1], conf[:-1], correct[:-1]
        with torch.no_grad():
            mean_conf = torch.where(count > 0, conf / count.clamp_min(1), float("nan"))
            acc = torch.where(count > 0, correct / count.clamp_min(1), float("nan"))
        edges = torch.linspace(0, 1, self.n_bins + 1, dtype=torch.float64)
        return Reliability(edges, count, mean_conf, acc)


@torch.no_grad()
def calibration_metrics(
    preds: Tensor,
    target: Tensor,
    *,
    log: bool = False,
    n_bins: int = DEFAULT_BINS,
    ignore_index: int | None = -100,
) -> dict[str, float]:
    """ECE, MCE, NLL, Brier score, accuracy and mean confidence of one set of predictions.

    Args:
        preds: probabilities ``(*, C)``, or log-probabilities with ``log=True``.
        target: class indices ``(*)``; ``ignore_index`` entries are skipped.
        n_bins: confidence bins for ECE.

    Returns:
        ``{"ece", "mce", "nll", "brier", "acc", "confidence", "count"}`` as floats (see
        :class:`Calibration`).
    """
    metric = Calibration(n_bins=n_bins, ignore_index=ignore_index).to(preds.device)
    metric.update(preds, target, log=log)
    return {k: float(v) for k, v in metric.compute().items()}


def reliability_diagram(
    bins: Reliability | Calibration | Mapping[str, Reliability | Calibration],
    *,
    title: str | None = None,
):
    """A reliability diagram: accuracy against confidence per bin, and the bins' occupancy.

    ``bins`` is one :class:`Reliability` (or :class:`Calibration`), or a mapping of labels to
    them to overlay several predictions (deterministic and MC, say). Top panel: each bin's
    accuracy at its mean confidence (the diagonal is perfect calibration; below it,
    overconfident); bottom: the fraction of targets in each bin. matplotlib is imported here.

    Returns:
        a :class:`matplotlib.figure.Figure` (close it with ``plt.close(fig)`` when done).
    """
    import matplotlib

    if matplotlib.get_backend().lower() not in ("agg", "pdf", "svg", "ps", "cairo"):
        matplotlib.use("Agg")  # headless: the figure only goes to files and TensorBoard
    import matplotlib.pyplot as plt

    series = dict(bins) if isinstance(bins, Mapping) else {"": bins}
    series = {k: (v.reliability() if isinstance(v, Calibration) else v) for k, v in series.items()}
    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(4.2, 4.8), dpi=80, sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    top.plot([0, 1], [0, 1], color="0.6", lw=1, ls="--", label="calibrated")
    width = None
    for i, (label, rel) in enumerate(series.items()):
        edges = rel.edges.double()
        width = float(edges[1] - edges[0])
        shown = rel.count > 0
        ece = float(((rel.accuracy - rel.confidence).abs() * rel.count)[shown].sum()
                    / rel.count.sum().clamp_min(1))  # fmt: skip
        name = f"{label + ', ' if label else ''}ECE {ece:.3f}"
        top.plot(rel.confidence[shown].numpy(), rel.accuracy[shown].numpy(), marker="o", ms=3,
                 lw=1.2, label=name)  # fmt: skip
        frac = (rel.count / rel.count.sum().clamp_min(1)).numpy()
        w = width / max(1, len(series))
        bottom.bar(edges[:-1].numpy() + i * w, frac, width=w, align="edge", label=label or None)
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    top.legend(fontsize=7, loc="upper left")
    if title:
        top.set_title(title, fontsize=9)
    bottom.set_xlabel("top-1 confidence")
    bottom.set_ylabel("fraction")
    # fixed margins: tight_layout doubled the cost of a figure logged at every validation
    fig.subplots_adjust(left=0.16, right=0.97, bottom=0.1, top=0.93 if title else 0.97,
                        hspace=0.08)  # fmt: skip
    return fig


class SplitCalibration(nn.Module):
    """A :class:`Calibration` per split (train/val/test) and kind (``""``, ``"mc"``, ...).

    For a task's evaluation: ``update(split, preds, target, kind=...)`` per batch, and at the
    epoch's end ``epoch_logs(split)``: ``{f"{split}/ece{suffix}", .../nll..., .../brier...}``
    for every kind that was updated (suffix ``""`` or ``"_mc"``; NaN if every target was
    ignored), after which the split is reset. :meth:`figure` draws the split's reliability
    diagram (all kinds overlaid); call it before ``epoch_logs``.
    """

    def __init__(
        self,
        kinds: tuple[str, ...] = ("", "mc"),
        splits: tuple[str, ...] = ("val", "test"),
        n_bins: int = DEFAULT_BINS,
    ) -> None:
        super().__init__()
        self.kinds, self.splits = tuple(kinds), tuple(splits)
        # "train" would clash with nn.Module.train as a ModuleDict key: keys end in "_"
        self.metrics = nn.ModuleDict(
            {self._key(s, k): Calibration(n_bins=n_bins) for s in splits for k in kinds}
        )

    @staticmethod
    def _key(split: str, kind: str) -> str:
        return f"{split}_{kind}_"

    def __getitem__(self, split_kind: str | tuple[str, str]) -> Calibration:
        split, kind = (split_kind, "") if isinstance(split_kind, str) else split_kind
        return self.metrics[self._key(split, kind)]

    def update(
        self, split: str, preds: Tensor, target: Tensor, *, kind: str = "", log: bool = False
    ) -> None:
        self[split, kind].update(preds, target, log=log)

    def _seen(self, split: str) -> list[str]:
        return [k for k in self.kinds if float(self[split, k].total) > 0]

    def figure(self, split: str, title: str | None = None):
        """The split's reliability diagram, or None if no targets were seen."""
        seen = self._seen(split)
        if not seen:
            return None
        labels = {k: ("deterministic" if k == "" else k.upper()) for k in seen}
        return reliability_diagram({labels[k]: self[split, k] for k in seen}, title=title)

    def log_figure(self, split: str, loggers: Any, step: int) -> bool:
        """Send the split's reliability diagram as ``{split}/reliability`` to every logger
        whose ``experiment`` has ``add_figure`` (TensorBoard's SummaryWriter). Call it before
        :meth:`epoch_logs`; returns whether a figure went out."""
        writers = [w for lg in loggers or () if callable(
            getattr(w := getattr(lg, "experiment", None), "add_figure", None))]  # fmt: skip
        if not writers:
            return False
        fig = self.figure(split, title=f"{split}, step {step}")
        if fig is None:
            return False
        import matplotlib.pyplot as plt

        for w in writers:
            w.add_figure(f"{split}/reliability", fig, global_step=step, close=False)
        plt.close(fig)
        return True

    def epoch_logs(self, split: str) -> dict[str, Tensor]:
        logs = {}
        for kind in self.kinds:
            metric = self[split, kind]
            # update_count, not the local target count, decides: every process of a
            # distributed run then agrees on which metrics to compute (and so to sync)
            if metric.update_count > 0:
                values = metric.compute()
                suffix = f"_{kind}" if kind else ""
                for name in ("ece", "nll", "brier"):
                    logs[f"{split}/{name}{suffix}"] = values[name].float()
            metric.reset()
        return logs
