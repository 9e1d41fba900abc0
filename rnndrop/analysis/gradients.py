"""How far gradients reach back in time: ``‖∂L_T / ∂x_{T-1-k}‖`` and ``‖∂L_T / ∂h_{T-1-k}‖``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..models import RecurrentStack

__all__ = ["default_distances", "gradient_through_time", "last_step_loss"]


def default_distances(T: int, n: int = 12) -> list[int]:
    """About ``n`` distances from 1 to ``T - 1``, spaced evenly on a log scale."""
    if T < 2:
        return []
    grid = torch.logspace(0, torch.log10(torch.tensor(T - 1.0)), n).round().long()
    return sorted(set(grid.tolist()))


def last_step_loss(model: nn.Module, pred_last: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Summed loss of the last step's prediction, and a mask of the samples that have one.

    ``y`` is the batch's target: ``(B, T)`` per step (``-100``: none) or ``(B,)`` for models
    with ``target == "last"``; regression (MSE) when ``pred_last`` has one output and ``y`` is
    floating point.
    """
    target = y[:, -1] if y.dim() == 2 else y
    if target.is_floating_point():
        valid = torch.ones_like(target, dtype=torch.bool)
        return F.mse_loss(pred_last.squeeze(-1), target, reduction="sum"), valid
    valid = target != -100
    if not valid.any():
        raise ValueError(
            "no sample has a target at the last step; gradient_through_time needs one "
            "(use a batch whose sequences end on a target, e.g. copy or delayed recall)"
        )
    return F.cross_entropy(pred_last[valid], target[valid], reduction="sum"), valid


def _parts(state) -> list:
    """A :class:`~rnndrop.models.RecurrentStack` state as a list with one state per part."""
    return state if isinstance(state, list) else [state]


def _h_leaves(state):
    """The state with every ``h`` detached as a leaf that needs grad (``c`` only detached).

    A part's state is ``(h, c)`` (LSTM) or ``h`` (GRU); the GRU's ``h`` is all of its state.
    """
    out = []
    for part in _parts(state):
        if isinstance(part, Tensor):  # GRU
            out.append(part.detach().requires_grad_(True))
        else:  # LSTM
            h, c = part
            out.append((h.detach().requires_grad_(True), c.detach()))
    return out if isinstance(state, list) else out[0]


def _hidden(state) -> list[Tensor]:
    """The ``h`` tensors of a :class:`~rnndrop.models.RecurrentStack` state, one per part."""
    return [part if isinstance(part, Tensor) else part[0] for part in _parts(state)]


def gradient_through_time(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    distances: Sequence[int] | None = None,
    *,
    wrt: str = "input",
    train: bool = False,
    seed: int = 0,
) -> dict[int, float]:
    """Mean gradient norm of the last step's loss with respect to what lies ``k`` steps back.

    ``wrt="input"``: ``‖∂L_T/∂x_{T-1-k}‖`` for the encoder's input features (any encoder,
    one backward pass, ``k ≥ 0``). ``wrt="state"``: ``‖∂L_T/∂h_{T-1-k}‖`` for the hidden state
    ``h`` of an LSTM or GRU encoder (:class:`~rnndrop.models.RecurrentStack`) after step
    ``T-1-k`` (all layers, ``k ≥ 1``), by running the sequence in two parts with ``h`` as a
    leaf. For the LSTM, ``c`` is carried as a separate node (not a function of ``h``), as in
    the step-by-step graph; for the GRU, ``h`` is the whole state. The norm is taken per sample
    over features (and layers) and averaged over the samples that have a target at the last
    step.

    Args:
        model: a :class:`~rnndrop.models.LanguageModel` or
            :class:`~rnndrop.models.SequenceModel` (anything with ``features``, ``encoder``
            and ``readout``).
        x, y: one batch, batch-first.
        distances: the ``k``; default :func:`default_distances`.
        wrt: ``"input"`` or ``"state"``.
        train: sample dropout masks (seeded by ``seed``) instead of the deterministic net.
    """
    T = x.shape[1]
    ks = list(distances) if distances is not None else default_distances(T)
    low = 0 if wrt == "input" else 1
    if any(not low <= k < T for k in ks):
        raise ValueError(f"distances must lie in [{low}, {T - 1}] for T={T}, got {ks}")
    if wrt == "state" and not isinstance(model.encoder, RecurrentStack):
        raise ValueError(
            "wrt='state' needs an LSTM or GRU encoder; use wrt='input' for the transformer"
        )
    if wrt not in ("input", "state"):
        raise ValueError(f"wrt must be 'input' or 'state', got {wrt!r}")
    was_training = model.training
    model.train(train)
    try:
        with torch.enable_grad(), torch.random.fork_rng():
            torch.manual_seed(seed)
            feats = model.features(x).detach()
            if wrt == "input":
                feats.requires_grad_(True)
                out, _, _ = model.encoder(feats)
                loss, valid = last_step_loss(model, model.readout(out[:, -1]), y)
                (g,) = torch.autograd.grad(loss, feats)
                norms = g.norm(dim=-1)[valid]  # (B', T)
                return {k: float(norms[:, T - 1 - k].mean()) for k in ks}
            result = {}
            for k in ks:
                _, _, state = model.encoder(feats[:, : T - k])
                state = _h_leaves(state)
                out, _, _ = model.encoder(feats[:, T - k :], state)
                loss, valid = last_step_loss(model, model.readout(out[:, -1]), y)
                grads = torch.autograd.grad(loss, _hidden(state))
                per_sample = torch.cat([g.transpose(0, 1).flatten(1) for g in grads], 1)
                result[k] = float(per_sample.norm(dim=1)[valid].mean())
            return result
    finally:
        model.train(was_training)
