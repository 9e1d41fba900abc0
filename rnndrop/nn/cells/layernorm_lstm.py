r"""The LayerNorm LSTM cell: its parameters, no fused op, and the loop path's per-step math.

Ba, Kiros & Hinton 2016 (Layer Normalization, §3.1 and the LSTM of its appendix), in
haste's form (lmnt-com/haste ``LayerNormLSTM``) and torch's gate order i, f, g, o. One step
with every mask the loop path carries::

    xp_t   = x_t W_ihᵀ                                  (one GEMM for all steps; no bias)
    hp_t   = (h_{t-1} ⊙ m^h_t) W_hhᵀ                     m^h: recurrent mask, per gate if untied
    a      = LN(xp_t; γ_x) + LN(hp_t; γ_h) + b          LN over the 4H gate vector, no β
    i, f, o = σ(a_i), σ(a_f), σ(a_o);  g = tanh(a_g)
    c̃_t   = m^c_t ⊙ (f ⊙ c_{t-1} + i ⊙ (g ⊙ m^g_t))      m^g: candidate mask (Semeniuta et al.)
                                                     m^c: cell mask (Moon et al. 2015)
    h̃_t   = o ⊙ tanh(LN(c̃_t; γ_c, β_c))
    c_t    = z^c_t ⊙ c_{t-1} + (1 - z^c_t) ⊙ c̃_t          zoneout (Krueger et al. 2016)
    h_t    = z^h_t ⊙ h_{t-1} + (1 - z^h_t) ⊙ h̃_t

``LN(v; γ, β) = γ ⊙ (v - mean(v)) / sqrt(var(v) + 1e-5) + β`` over the last dim (biased
variance: ``torch.nn.functional.layer_norm`` and haste). ``b = b_ih + b_hh`` is added after
the normalisation (before it, the mean subtraction would remove it).

Zoneout on ``c`` and ``LN(c)``: the output candidate ``h̃_t`` normalises the new cell value
``c̃_t``, before zoneout, as the LSTM here computes ``o ⊙ tanh(c̃_t)`` (and haste, whose
zoneout acts on ``h`` only). Normalising the zoned-out ``c_t`` instead would couple the
units: LN's mean and variance run over all ``H`` units, so every unit's ``h̃`` would depend
on which other units kept their old value. Zoneout stays a per-unit choice of the previous
``h`` and ``c``; without zoneout both readings are the same.

The recurrent mask acts on ``h_{t-1}`` before ``W_hh`` (Gal & Ghahramani 2016), so LN sees
the masked product; input masks act on ``x`` before ``W_ih``. Classic scaling of ``W_hh``
(or of the recurrent site) is undone by ``LN(hp)``, which is scale-invariant up to ``ε``:
that is the model's math, kept as is.

The cell has no fused ATen op (``fused=None``): every forward runs a loop backend
(``python``, ``cpp``). :func:`step_forward` / :func:`step_backward` are the reference;
``rnndrop/kernels/cpp/cell_layernorm_lstm.h`` has the same math in C++, and
:func:`reference_step` is the plain-autograd step (torch.func, export, double backward).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ...kernels.contract import LayerMasks, Saved, State
from .base import Cell
from .lstm import gate_backward

__all__ = ["LAYERNORM_LSTM_CELL"]

EPS = 1e-5  # LayerNorm's ε (haste, torch.nn.LayerNorm's default)


def _norm(v: Tensor) -> tuple[Tensor, Tensor]:
    """``(v̂, rstd)``: ``v`` normalised over its last dim, and ``1/sqrt(var + ε)`` (B, 1)."""
    d = v - v.mean(-1, keepdim=True)
    r = torch.rsqrt(d.square().mean(-1, keepdim=True) + EPS)
    return d * r, r


def _norm_backward(dy: Tensor, yhat: Tensor, r: Tensor) -> Tensor:
    """dL/dv from dL/dv̂ for ``v̂ = (v - mean) · rstd``: ``rstd (dy - ⟨dy⟩ - v̂ ⟨dy ⊙ v̂⟩)``."""
    mean_dy = dy.mean(-1, keepdim=True)
    mean_dyy = (dy * yhat).mean(-1, keepdim=True)
    return r * (dy - mean_dy - yhat * mean_dyy)


def _split(row: Tensor, H: int) -> tuple[Tensor, ...]:
    """The saved row (B, 9H + 3): ``x̂`` (4H), ``ĥ`` (4H), ``ĉ`` (H), rstd of x, h, c."""
    xn, hn, cn, r = row.split([4 * H, 4 * H, H, 3], -1)
    return xn, hn, cn, r[:, 0:1], r[:, 1:2], r[:, 2:3]


def step_forward(a: Tensor, rec: Tensor, prev: State, m: LayerMasks, out: Saved | None = None,
                 *, params: tuple[Tensor, ...]) -> State:  # fmt: skip
    """One step: ``a`` ``(B, 4H)`` the input projection ``xp_t`` (no bias), ``rec`` the
    recurrent product ``hp_t`` -> ``(h_t, c_t)``.

    ``params`` = ``(b, γ_x, γ_h, γ_c, β_c)``; ``m``: the step's masks (``candidate``,
    ``cell``, ``zoneout_h``, ``zoneout_c``). In the loop (``out``: the step's :class:`Saved` rows)
    ``a`` becomes the activations in place and the step saves ``x̂``, ``ĥ``, ``ĉ`` and their
    inverse standard deviations into ``out.extra``, ``c̃_t`` into ``out.ct_seq`` where
    zoneout needs it; with ``out=None`` every op is out of place (``torch.nn.functional.
    layer_norm``: differentiable by autograd, the plain-autograd loop's step).
    """
    b, g_x, g_h, g_c, b_c = params
    H = prev.c.shape[-1]
    if out is None:
        pre = (F.layer_norm(a, (4 * H,), g_x, None, EPS)
               + F.layer_norm(rec, (4 * H,), g_h, None, EPS) + b)  # fmt: skip
        i, f, g, o = pre.chunk(4, 1)
        i, f, g, o = i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()
    else:
        xn, hn, cn, rx, rh, rc = _split(out.extra, H)
        for v, vn, rv in ((a, xn, rx), (rec, hn, rh)):
            vhat, r = _norm(v)
            vn.copy_(vhat)
            rv.copy_(r)
        torch.addcmul(torch.addcmul(b, g_x, xn), g_h, hn, out=a)
        a[:, 2 * H : 3 * H].tanh_()
        a[:, : 2 * H].sigmoid_()
        a[:, 3 * H :].sigmoid_()
        i, f, g, o = a.chunk(4, 1)
    gm = g if m.candidate is None else g * m.candidate
    ct = torch.addcmul(f * prev.c, i, gm)
    if m.cell is not None:
        ct = ct * m.cell
    if out is None:
        h = o * F.layer_norm(ct, (H,), g_c, b_c, EPS).tanh()
    else:
        chat, r = _norm(ct)
        cn.copy_(chat)
        rc.copy_(r)
        h = o * torch.addcmul(b_c, g_c, chat).tanh()
        if out.ct_seq is not None:
            out.ct_seq.copy_(ct)
    c = ct if m.zoneout_c is None else torch.lerp(ct, prev.c, m.zoneout_c)
    if m.zoneout_h is not None:
        h = torch.lerp(h, prev.h, m.zoneout_h)
    return State(h, c)


def step_backward(d: State, prev: State, s: Saved, m: LayerMasks, dgx: Tensor, dgh: Tensor,
                  dm: LayerMasks | None = None, *, params: tuple[Tensor, ...],
                  dparams: tuple[Tensor, ...]) -> State:  # fmt: skip
    """Backward of :func:`step_forward`.

    ``d`` = ``(dL/dh_t, dL/dc_t)`` (all paths). Writes dL/d(xp_t) into ``dgx`` and
    dL/d(hp_t) into ``dgh`` (through their LayerNorms), and adds this step's gradients of
    ``(b, γ_x, γ_h, γ_c, β_c)`` into ``dparams`` (``(B, n)`` each). Returns ``(zoneout's
    carry into h_{t-1} or None, dL/dc_{t-1})``. ``dm``: None, or ``(B, H)`` buffers (a field
    None if not wanted) for the gradients of this step's masks (concrete dropout)::

        dL/dm^g = dL/dc̃ ⊙ m^c ⊙ i ⊙ g,  dL/dm^c = dL/dc̃ ⊙ (f ⊙ c_{t-1} + i ⊙ g ⊙ m^g),
        dL/dz^h = dL/dh_t ⊙ (h_{t-1} − h̃_t),  dL/dz^c = dL/dc_t ⊙ (c_{t-1} − c̃_t)
    """
    _, g_x, g_h, g_c, b_c = params
    d_b, d_gx, d_gh, d_gc, d_bc = dparams
    zh, zc = m.zoneout_h, m.zoneout_c
    H = prev.c.shape[-1]
    xn, hn, cn, rx, rh, rc = _split(s.extra, H)
    o = s.acts[:, 3 * H :]
    dht = d.h if zh is None else d.h * (1 - zh)
    tn = torch.addcmul(b_c, g_c, cn).tanh()
    dn = dht * o * (1 - tn * tn)  # dL/dLN(c̃)
    d_gc.addcmul_(dn, cn)
    d_bc.add_(dn)
    dct = _norm_backward(dn * g_c, cn, rc)
    dct = dct + (d.c if zc is None else d.c * (1 - zc))  # dL/dc̃_t
    carry = gate_backward(d, prev, s, m, dgx, dm, dct, dht, tn)  # dgx: dL/d(gates) first
    d_b.add_(dgx)
    d_gx.addcmul_(dgx, xn)
    d_gh.addcmul_(dgx, hn)
    dgh.copy_(_norm_backward(dgx * g_h, hn, rh))
    dgx.copy_(_norm_backward(dgx * g_x, xn, rx))
    return carry


def reference_step(xp, rec, h, c, m: LayerMasks, params) -> tuple[Tensor, Tensor]:
    """The plain-autograd loop's step (:mod:`rnndrop.kernels.reference`): ``(h̃_t, c_t)``,
    :func:`step_forward` out of place; ``m``: the step's masks but zoneout on ``h``, which
    is left to the loop."""
    return tuple(step_forward(xp, rec, State(h, c), m, params=params))


def _split_bias(b_ih: Tensor, b_hh: Tensor) -> tuple[None, None]:
    return None, None  # the gate bias comes after the LayerNorms: LayerInputs.extra


def _extra_inputs(b_ih, b_hh, g_x, g_h, g_c, b_c) -> tuple[Tensor, ...]:
    """``LayerInputs.extra``: ``(b, γ_x, γ_h, γ_c, β_c)``, ``b = b_ih + b_hh`` (zeros
    without bias)."""
    b = g_x.new_zeros(g_x.shape) if b_ih is None else b_ih + b_hh
    return b, g_x, g_h, g_c, b_c


# (name, size in units of H, initial value): γ_x, γ_h, γ_c, β_c per layer and direction
_EXTRA_PARAMS = (
    ("gamma_ih", 4, 1.0),
    ("gamma_hh", 4, 1.0),
    ("gamma_c", 1, 1.0),
    ("beta_c", 1, 0.0),
)


def _saved_width(H: int) -> int:
    return 9 * H + 3  # x̂, ĥ (4H each), ĉ (H), rstd of x, h, c


LAYERNORM_LSTM_CELL = Cell(
    name="layernorm_lstm",
    mode="LayerNormLSTM",
    gates=4,
    gate_names=("i", "f", "g", "o"),
    has_cell=True,
    split_recurrent=True,  # LN(hp) needs hp apart from xp
    fused=None,
    split_bias=_split_bias,
    step_forward=step_forward,
    step_backward=step_backward,
    extra_params=_EXTRA_PARAMS,
    extra_inputs=_extra_inputs,
    saved_width=_saved_width,
    reference_step=reference_step,
)
