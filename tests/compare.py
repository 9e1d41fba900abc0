"""One comparison of a recurrent module against its independent reference (tests/reference.py)."""

from __future__ import annotations

import pytest
import torch

from rnndrop.config import RecurrentDropout
from rnndrop.nn import GRU, LSTM, RNN

LAYERS = {"lstm": LSTM, "gru": GRU, "rnn": RNN}


def layer_for(cell: str, cfg: RecurrentDropout | None, *args, **kw):
    """rnndrop's ``cell`` layer (``"lstm"``, ``"gru"``, ``"rnn"``) with ``cfg`` as the cell
    reads it: zoneout on ``h`` alone without a cell state; a scheme that sets a site the cell
    lacks (the Elman RNN's candidate) skips the test."""
    if cell != "lstm" and cfg is not None and cfg.zoneout_cell:
        cfg = RecurrentDropout(zoneout_hidden=cfg.zoneout_hidden)  # no cell state
    if cell == "rnn" and cfg is not None and cfg.candidate:
        pytest.skip("the Elman RNN has no gated candidate (Semeniuta's site)")
    return LAYERS[cell](*args, dropout=cfg, **kw)


def _states(state) -> tuple:
    return state if isinstance(state, tuple) else (state,)


def assert_matches_reference(module, reference, x, hx, sample: bool, tol: float = 1e-10):
    """Outputs, final state, pre-dropout output and every gradient of ``module`` equal the
    reference's, run with the masks the module recorded in this forward.

    ``reference(module, x, hx, masks, sample=...)`` returns ``(out, state, pre)`` with the
    module's state layout (``(h, c)`` or ``h``). Returns the masks compared with.
    """
    module.record_masks = True
    leaves = [x, *_states(hx if hx is not None else ()), *module.parameters()]
    out, state, pre = module(x, hx, return_pre_dropout=True)
    ref_out, ref_state, ref_pre = reference(module, x, hx, module.last_masks, sample=sample)
    ours, theirs = (out, *_states(state), pre), (ref_out, *_states(ref_state), ref_pre)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)
    weights = [torch.randn_like(t) for t in ours[:-1]]

    def loss(ts):
        return sum((w * t).sum() for w, t in zip(weights, ts, strict=True))

    g = torch.autograd.grad(loss(ours[:-1]), leaves, allow_unused=True)
    rg = torch.autograd.grad(loss(theirs[:-1]), leaves, allow_unused=True)
    for a, b in zip(g, rg, strict=True):
        if a is None or b is None:
            assert a is None or a.abs().max() == 0
            assert b is None or b.abs().max() == 0
            continue
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)
    return module.last_masks
