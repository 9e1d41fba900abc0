"""One comparison of a recurrent module against its independent reference (tests/reference.py)."""

from __future__ import annotations

import torch


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
