r"""The per-step LSTM math of the loop path, and backprop through time by hand.

One step, with the masks the loop path supports (torch's gate order i, f, g, o)::

    a      = xp_t + (h_{t-1} ⊙ m^h_t) W_hhᵀ            (m^h: recurrent mask, per gate if untied)
    i, f, o = σ(a_i), σ(a_f), σ(a_o);  g = tanh(a_g)
    c̃_t   = f ⊙ c_{t-1} + i ⊙ (g ⊙ m^g_t)                (m^g: candidate mask, Semeniuta)
    h̃_t   = o ⊙ tanh(c̃_t)
    c_t    = z^c_t ⊙ c_{t-1} + (1 - z^c_t) ⊙ c̃_t          (zoneout, Krueger; z = 0 without it)
    h_t    = z^h_t ⊙ h_{t-1} + (1 - z^h_t) ⊙ h̃_t

``xp_t = x_t W_ihᵀ + b_ih + b_hh`` is computed for all steps in one GEMM before the loop.
:class:`LSTMLayer` runs a whole layer (one direction) forward and backward as one
autograd node, with backprop through time written by hand: no node per step, and
every weight gradient is one GEMM over all T·B rows. The layer runs in the compiled
kernel (``csrc/lstm_loop.cpp``) when it is available for the tensors at hand, else in
:func:`_loop_forward` / :func:`_loop_backward` below; both implement exactly these
equations and are tested against each other.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .. import _ext

__all__ = ["LSTMLayer", "lstm_layer", "use_extension"]


def use_extension(x: Tensor) -> bool:
    """True if the compiled loop will run for this input (CPU float32/float64)."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
        return False
    if os.environ.get("RNNDROP_LOOP", "auto") == "python":
        return False
    return _ext.load() is not None


def _at(m: Tensor | None, t: int) -> Tensor | None:
    if m is None:
        return None
    return m[0] if m.shape[0] == 1 else m[t]


# ---- one step ---------------------------------------------------------------------


def _step_forward(
    a: Tensor,
    c_prev: Tensor,
    h_prev: Tensor,
    cm: Tensor | None,
    zh: Tensor | None,
    zc: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """In place: ``a`` (B, 4H) pre-activations -> activations. Returns (c_t, h_t, c̃_t)."""
    H = c_prev.shape[-1]
    a[:, 2 * H : 3 * H].tanh_()
    a[:, : 2 * H].sigmoid_()
    a[:, 3 * H :].sigmoid_()
    i, f, g, o = a.chunk(4, 1)
    gm = g if cm is None else g * cm
    ct = torch.addcmul(f * c_prev, i, gm)
    h = o * ct.tanh()
    c = ct if zc is None else torch.lerp(ct, c_prev, zc)
    if zh is not None:
        h = torch.lerp(h, h_prev, zh)
    return c, h, ct


def _step_backward(
    acts: Tensor,
    c_prev: Tensor,
    ct: Tensor,
    cm: Tensor | None,
    zh: Tensor | None,
    zc: Tensor | None,
    d: Tensor,
    dc: Tensor,
    dgates: Tensor,
) -> tuple[Tensor, Tensor]:
    """Backward of :func:`_step_forward`.

    ``d`` is dL/dh_t (all paths), ``dc`` is dL/dc_t. Writes dL/d(pre-activations) into
    ``dgates`` (B, 4H); returns the zoneout carry into h_{t-1} (or None) and dL/dc_{t-1}
    except for the part through the recurrent GEMM, which the caller adds.
    """
    i, f, g, o = acts.chunk(4, 1)
    dht = d if zh is None else d * (1 - zh)
    dcn = dc if zc is None else dc * (1 - zc)
    tc = ct.tanh()
    dcn = dcn + dht * o * (1 - tc * tc)
    gm = g if cm is None else g * cm
    dg = dcn * i if cm is None else dcn * i * cm
    gi, gf, gg, go = dgates.chunk(4, 1)
    torch.mul(dcn * gm, i * (1 - i), out=gi)
    torch.mul(dcn * c_prev, f * (1 - f), out=gf)
    torch.mul(dg, 1 - g * g, out=gg)
    torch.mul(dht * tc, o * (1 - o), out=go)
    dc_prev = dcn * f if zc is None else dcn * f + dc * zc
    carry = None if zh is None else d * zh
    return carry, dc_prev


# ---- the loop in PyTorch ------------------------------------------------------


def _recurrent_gemm(out: Tensor, hm: Tensor, w_hh: Tensor) -> None:
    """out += hm W_hhᵀ, with hm (G, B, H): one GEMM (G=1) or one per gate (G=4)."""
    if hm.shape[0] == 1:
        out.addmm_(hm[0], w_hh.t())
        return
    H = w_hh.shape[1]
    for k in range(4):
        sl = slice(k * H, (k + 1) * H)
        out[:, sl].addmm_(hm[k], w_hh[sl].t())


def _project(x: Tensor, w_ih: Tensor, bias: Tensor | None, in_mask: Tensor | None) -> Tensor:
    """x W_ihᵀ + b for all steps; per gate (x ⊙ m_k) W_ih,kᵀ with untied input masks."""
    if in_mask is None:
        acts = torch.nn.functional.linear(x, w_ih)
    else:
        H = w_ih.shape[0] // 4
        acts = torch.cat([(x * in_mask[k]) @ w_ih[k * H : (k + 1) * H].t() for k in range(4)], -1)
    return acts if bias is None else acts.add_(bias)


def _loop_forward(
    x, w_ih, bias, in_mask, w_hh, h0, c0, rec_mask, cand_mask, zone_h, zone_c, reverse
):
    T, B, _ = x.shape
    H = w_hh.shape[1]
    acts = x.clone() if w_ih is None else _project(x, w_ih, bias, in_mask)
    h_seq = x.new_empty(T, B, H)
    c_seq = x.new_empty(T, B, H)
    ct_seq = x.new_empty(T, B, H) if zone_c is not None else None
    G = rec_mask.shape[1] if rec_mask is not None else 1
    hm_seq = x.new_empty(T, G, B, H) if rec_mask is not None else None
    h, c = h0, c0
    for t in range(T - 1, -1, -1) if reverse else range(T):
        hm = h.unsqueeze(0) if hm_seq is None else torch.mul(h, _at(rec_mask, t), out=hm_seq[t])
        _recurrent_gemm(acts[t], hm, w_hh)
        c_new, h_new, ct = _step_forward(
            acts[t], c, h, _at(cand_mask, t), _at(zone_h, t), _at(zone_c, t)
        )
        c_seq[t].copy_(c_new)
        h_seq[t].copy_(h_new)
        if ct_seq is not None:
            ct_seq[t].copy_(ct)
        h, c = h_seq[t], c_seq[t]
    return h_seq, c_seq, acts, ct_seq, hm_seq


def _loop_backward(dh_seq, dc_last, x, w_ih, has_bias, in_mask, w_hh, h0, c0, acts, h_seq, c_seq,
                   ct_seq, hm_seq, rec_mask, cand_mask, zone_h, zone_c, reverse,
                   need_x, need_w):  # fmt: skip
    T, B, _ = acts.shape
    H = w_hh.shape[1]
    G = rec_mask.shape[1] if rec_mask is not None else 1
    dgates = torch.empty_like(acts)
    carry = torch.zeros(B, H, dtype=acts.dtype, device=acts.device)
    dc = dc_last
    dh_rec, m_next = None, None  # dL/d(masked h_t) from the step after t, and its mask
    for t in range(T) if reverse else range(T - 1, -1, -1):
        first = t == (T - 1 if reverse else 0)
        d = carry if dh_seq is None else carry + dh_seq[t]
        if dh_rec is not None:
            d = d + (dh_rec if m_next is None else dh_rec * m_next).sum(0)
        c_prev = c0 if first else c_seq[t + 1 if reverse else t - 1]
        ct = c_seq[t] if ct_seq is None else ct_seq[t]
        carry, dc = _step_backward(
            acts[t], c_prev, ct, _at(cand_mask, t), _at(zone_h, t), _at(zone_c, t),
            d, dc, dgates[t],
        )  # fmt: skip
        if carry is None:
            carry = torch.zeros_like(d)
        if G == 1:
            dh_rec = (dgates[t] @ w_hh).unsqueeze(0)
        else:
            dh_rec = torch.stack([dgates[t, :, k * H : (k + 1) * H] @ w_hh[k * H : (k + 1) * H]
                                  for k in range(4)])  # fmt: skip
        m_next = _at(rec_mask, t)
    dh0 = carry + (dh_rec if m_next is None else dh_rec * m_next).sum(0)
    dw_hh = _weight_grad(dgates, h0, h_seq, hm_seq, reverse) if need_w else None
    dx = dw_ih = db = None
    if w_ih is not None:
        dg2 = dgates.view(T * B, -1)
        if in_mask is None:
            dx = (dg2 @ w_ih).view_as(x) if need_x else None
            dw_ih = dg2.t() @ x.reshape(T * B, -1) if need_w else None
        else:  # gate k saw x ⊙ m_k
            gates = [slice(k * H, (k + 1) * H) for k in range(4)]
            if need_x:
                dx = sum((dg2[:, g] @ w_ih[g]).view_as(x) * in_mask[k] for k, g in enumerate(gates))
            if need_w:
                xs = [(x * in_mask[k]).reshape(T * B, -1) for k in range(4)]
                dw_ih = torch.cat([dg2[:, g].t() @ xs[k] for k, g in enumerate(gates)])
        db = dg2.sum(0) if need_w and has_bias else None
    return dgates, dh0, dc, dw_hh, dx, dw_ih, db


def _weight_grad(dgates: Tensor, h0: Tensor, h_seq: Tensor, hm_seq: Tensor | None, reverse):
    """dL/dW_hh = Σ_t dgates_tᵀ (masked h_{t-1}): one GEMM over all T·B rows per gate group."""
    T, B, G4 = dgates.shape
    H = G4 // 4
    if hm_seq is None:
        prev = torch.cat([h_seq[1:], h0[None]]) if reverse else torch.cat([h0[None], h_seq[:-1]])
        return dgates.reshape(T * B, G4).t() @ prev.reshape(T * B, H)
    if hm_seq.shape[1] == 1:
        return dgates.reshape(T * B, G4).t() @ hm_seq.reshape(T * B, H)
    dg = dgates.reshape(T * B, 4, H)
    return torch.cat([dg[:, k].t() @ hm_seq[:, k].reshape(T * B, H) for k in range(4)])


# ---- the autograd node ----------------------------------------------------------


class LSTMLayer(torch.autograd.Function):
    """Forward and backward of one layer and direction, the time loop included."""

    @staticmethod
    def forward(ctx, x, w_ih, bias, in_mask, w_hh, h0, c0, rec_mask, cand_mask, zone_h, zone_c,
                reverse, compiled):  # fmt: skip
        args = (x, w_ih, bias, in_mask, w_hh, h0, c0, rec_mask, cand_mask, zone_h, zone_c, reverse)
        if compiled:
            h_seq, c_seq, acts, ct_seq, hm_seq = _ext.load().forward(*args)
        else:
            h_seq, c_seq, acts, ct_seq, hm_seq = _loop_forward(*args)
        ctx.reverse, ctx.compiled, ctx.has_bias = reverse, compiled, bias is not None
        ctx.save_for_backward(x, w_ih, in_mask, w_hh, h0, c0, acts, h_seq, c_seq, ct_seq,
                              hm_seq, rec_mask, cand_mask, zone_h, zone_c)  # fmt: skip
        return h_seq, (c_seq[0] if reverse else c_seq[-1])

    @staticmethod
    @once_differentiable
    def backward(ctx, dh_seq, dc_last):
        (x, w_ih, in_mask, w_hh, h0, c0, acts, h_seq, c_seq, ct_seq, hm_seq,
         rec_mask, cand_mask, zone_h, zone_c) = ctx.saved_tensors  # fmt: skip
        if dc_last is None:
            dc_last = torch.zeros_like(c0)
        need = ctx.needs_input_grad
        need_x, need_w = need[0], need[1] or need[2] or need[4]
        args = (None if dh_seq is None else dh_seq.contiguous(), dc_last.contiguous(), x, w_ih,
                ctx.has_bias, in_mask, w_hh, h0, c0, acts, h_seq, c_seq, ct_seq, hm_seq, rec_mask,
                cand_mask, zone_h, zone_c, ctx.reverse, need_x, need_w)  # fmt: skip
        if ctx.compiled:
            dgates, dh0, dc0, dw_hh, dx, dw_ih, db = _ext.load().backward(*args)
        else:
            dgates, dh0, dc0, dw_hh, dx, dw_ih, db = _loop_backward(*args)
        if w_ih is None:
            dx = dgates
        return dx, dw_ih, db, None, dw_hh, dh0, dc0, None, None, None, None, None, None


@torch.compiler.disable  # a hand-written autograd node (and C++): opaque to dynamo
def lstm_layer(
    x: Tensor,
    w_ih: Tensor | None,
    bias: Tensor | None,
    w_hh: Tensor,
    h0: Tensor,
    c0: Tensor,
    *,
    in_mask: Tensor | None = None,
    rec_mask: Tensor | None = None,
    cand_mask: Tensor | None = None,
    zone_h: Tensor | None = None,
    zone_c: Tensor | None = None,
    reverse: bool = False,
    compiled: bool | None = None,
) -> tuple[Tensor, Tensor]:
    """Run one LSTM layer (one direction): ``h`` for every step (T, B, H) and the last ``c``.

    Args:
        x: ``(T, B, I)`` layer input; or, with ``w_ih=None``, the ``(T, B, 4H)`` input
            projection including biases (for untied input masks, projected per gate).
        w_ih: ``(4H, I)`` input weight, or None.
        bias: ``(4H,)`` ``b_ih + b_hh``, or None.
        in_mask: ``(4, T or 1, B or 1, I)`` input mask per gate (untied), or None.
        w_hh: ``(4H, H)`` recurrent weight as used this call.
        h0, c0: ``(B, H)`` initial state.
        rec_mask: ``(T or 1, G, B, H)`` mask on ``h_{t-1}``; ``G`` = 1 (tied) or 4 (per gate).
        cand_mask: ``(T or 1, B, H)`` mask on ``tanh(g)``.
        zone_h, zone_c: ``(T or 1, B, H)`` weight given to the previous value.
        reverse: run from the last step to the first (the backward direction).
        compiled: force the C++ (True) or PyTorch (False) loop; default: C++ when usable.
    """
    if compiled is None:
        compiled = use_extension(x)
    elif compiled and not use_extension(x):
        raise RuntimeError(
            "the compiled LSTM loop is not available for these tensors (it needs CPU "
            "float32/float64 and a successful build; see RNNDROP_EXTENSION)"
        )

    def prep(m: Tensor | None) -> Tensor | None:
        return None if m is None else m.to(x.dtype).contiguous()

    return LSTMLayer.apply(
        x.contiguous(),
        None if w_ih is None else w_ih.contiguous(),
        None if bias is None else bias.contiguous(),
        prep(in_mask),
        w_hh.contiguous(),
        h0.contiguous(),
        c0.contiguous(),
        prep(rec_mask),
        prep(cand_mask),
        prep(zone_h),
        prep(zone_c),
        reverse,
        compiled,
    )
