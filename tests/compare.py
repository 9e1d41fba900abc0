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


def assert_matches_reference(
    module,
    reference,
    x,
    hx,
    sample: bool,
    tol: float = 1e-10,
    rtol: float | None = None,
    ref_dtype: torch.dtype | None = None,
):
    """Outputs, final state, pre-dropout output and every gradient of ``module`` equal the
    reference's, run with the masks the module recorded in this forward.

    ``reference(module, x, hx, masks, sample=...)`` returns ``(out, state, pre)`` with the
    module's state layout (``(h, c)`` or ``h``). ``ref_dtype`` (float64 for a float32
    backend): the reference runs on a copy of the module, the input and the masks in that
    dtype, so only the module's rounding is measured. The rate parameters of concrete dropout
    are left out: the recorded masks are detached (their gradients: tests/test_concrete.py).
    Returns the masks compared with.
    """
    rtol = tol if rtol is None else rtol
    module.record_masks = True
    hxs = _states(hx if hx is not None else ())
    params = [p for n, p in module.named_parameters() if not n.startswith("dropout_logit")]
    out, state, pre = module(x, hx, return_pre_dropout=True)
    masks = module.last_masks
    ref_module, rx, rhx, rparams = module, x, hx, params
    if ref_dtype is not None and ref_dtype != x.dtype:
        import copy

        ref_module = copy.deepcopy(module).to(ref_dtype)
        rparams = [p for n, p in ref_module.named_parameters()
                   if not n.startswith("dropout_logit")]  # fmt: skip
        rx = x.detach().to(ref_dtype).requires_grad_(x.requires_grad)
        rhxs = tuple(h.detach().to(ref_dtype).requires_grad_(h.requires_grad) for h in hxs)
        rhx = None if hx is None else rhxs if isinstance(hx, tuple) else rhxs[0]
        masks = {k: m.to(ref_dtype) for k, m in masks.items()}
    ref_out, ref_state, ref_pre = reference(ref_module, rx, rhx, masks, sample=sample)
    ours, theirs = (out, *_states(state), pre), (ref_out, *_states(ref_state), ref_pre)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a.to(b.dtype), b, atol=tol, rtol=rtol)
    weights = [torch.randn_like(t) for t in theirs[:-1]]

    def loss(ts):
        return sum((w.to(t.dtype) * t).sum() for w, t in zip(weights, ts, strict=True))

    g = torch.autograd.grad(loss(ours[:-1]), [x, *hxs, *params], allow_unused=True)
    rleaves = [rx, *_states(rhx if rhx is not None else ()), *rparams]
    rg = torch.autograd.grad(loss(theirs[:-1]), rleaves, allow_unused=True)
    for a, b in zip(g, rg, strict=True):
        if a is None or b is None:
            assert a is None or a.abs().max() == 0
            assert b is None or b.abs().max() == 0
            continue
        # across dtypes the rounding grows with the gradient's size (a LayerNorm's reach 10s)
        scale = max(1.0, b.abs().max().item()) if ref_dtype is not None else 1.0
        torch.testing.assert_close(a.to(b.dtype), b, atol=tol * scale, rtol=rtol)
    return module.last_masks
