r"""The LayerNorm LSTM's pointwise math for the ``triton`` step kernels (``_kernels.py``).

Ba et al. 2016 in haste's form, gates i, f, g, o; the step of
:mod:`rnndrop.nn.cells.layernorm_lstm` without zoneout (the loops apply it)::

    a    = LN(xp_t; γ_x) + LN(hp_t; γ_h) + b      over the 4H gate vector, no shift
    c̃_t = m^c_t ⊙ (f ⊙ c_{t-1} + i ⊙ (g ⊙ m^g_t))  m^g: candidate mask, m^c: cell mask
    h̃_t = o ⊙ tanh(LN(c̃_t; γ_c, β_c))

A split cell (``ps`` holds ``hp_t``) in the row layout (``ROWS``): its program owns one
batch row, ``xs`` / ``ps`` are the row's four gate blocks and ``n`` their lanes, so the
LayerNorms reduce over the row with :func:`row_sum`. ``EX`` is ``LayerInputs.extra``
packed (14H: ``b``, ``γ_x``, ``γ_h`` (4H each), ``γ_c``, ``β_c`` (H each)); ``SV`` the
step's saved row (9H + 3: ``x̂``, ``ĥ`` (4H each), ``ĉ`` (H), the rstd of x, h, c), the
layout of the python and cpp backends; ``DEX`` the row's 14H gradient accumulator.
Padding lanes (``n ≥ H``) load as 0 and are kept out of every mean.
"""

# Triton's front end has no starred expressions: tuples of gate blocks grow by `+`
# ruff: noqa: RUF005

import triton.language as tl

from ._kernels import CANDIDATE, CELL, load32, put, row_sum, sigmoid, tanh, zeros_like
from .cell_lstm import gate_backward

STEP_MASKS = ("candidate", "cell")  # the step masks it reads (the loop applies zoneout)

LN_EPS = tl.constexpr(1e-5)  # nn/cells/layernorm_lstm.py's EPS (haste, torch's default)


def _ln4(vs, m, H):
    """The four gate blocks of a row normalised over all 4H: (v̂ per block, rstd)."""
    mean = row_sum(vs[0] + vs[1] + vs[2] + vs[3]) / (4 * H)
    ds = ()
    q = zeros_like(vs[0])
    for k in tl.static_range(4):
        d = tl.where(m, vs[k] - mean, 0.0)  # padding lanes would add mean² each
        ds = ds + (d,)
        q = q + d * d
    r = 1.0 / tl.sqrt(row_sum(q) / (4 * H) + LN_EPS)
    out = ()
    for k in tl.static_range(4):
        out = out + (ds[k] * r,)
    return out, r


def _ln1(v, m, H):
    """One block normalised over its H lanes: (v̂, rstd)."""
    d = tl.where(m, v - row_sum(tl.where(m, v, 0.0)) / H, 0.0)
    r = 1.0 / tl.sqrt(row_sum(d * d) / H + LN_EPS)
    return d * r, r


def _ln4_backward(dys, ys, r, H):
    """dL/dv per block from dL/dv̂ (zero on padding lanes): rstd (dy − ⟨dy⟩ − v̂ ⟨dy ⊙ v̂⟩)."""
    m1 = row_sum(dys[0] + dys[1] + dys[2] + dys[3]) / (4 * H)
    m2 = row_sum(dys[0] * ys[0] + dys[1] * ys[1] + dys[2] * ys[2] + dys[3] * ys[3]) / (4 * H)
    out = ()
    for k in tl.static_range(4):
        out = out + (r * (dys[k] - m1 - ys[k] * m2),)
    return out


def _accumulate(P, v, m):
    tl.store(P, load32(P, m) + v, mask=m)  # the program's own row: no other program adds


def forward(xs, ps, h, c, ms, SM, EX, SV, n, m, H):
    """xs: the input projection (no bias), ps: the recurrent product, per gate block."""
    xn, rx = _ln4(xs, m, H)
    hn, rh = _ln4(ps, m, H)
    a = ()
    for k in tl.static_range(4):
        gx = load32(EX + (4 + k) * H + n, m)
        gh = load32(EX + (8 + k) * H + n, m)
        a = a + (gx * xn[k] + gh * hn[k] + load32(EX + k * H + n, m),)
        tl.store(SV + k * H + n, xn[k], mask=m)
        tl.store(SV + (4 + k) * H + n, hn[k], mask=m)
    i = sigmoid(a[0])
    f = sigmoid(a[1])
    g = tanh(a[2])
    o = sigmoid(a[3])
    gm = g
    if SM[CANDIDATE] is not None:
        gm = g * ms[CANDIDATE]
    ct = f * c + i * gm
    if SM[CELL] is not None:
        ct = ct * ms[CELL]
    cn, rc = _ln1(ct, m, H)
    tl.store(SV + 8 * H + n, cn, mask=m)
    tl.store(SV + 9 * H + n, tl.where(n == 0, rx, tl.where(n == 1, rh, rc)), mask=n < 3)
    tn = tanh(load32(EX + 12 * H + n, m) * cn + load32(EX + 13 * H + n, m))
    return (i, f, g, o), o * tn, ct, ct


def backward(acts, aux, hp, cp, ct, dh, dc, ms, SM, EX, SV, DEX, n, m, H):
    """dh: dL/dh̃_t, dc: dL/dc̃_t from later steps (zoneout's shares taken off); adds this
    step's gradients of (b, γ_x, γ_h, γ_c, β_c) into DEX."""
    i = acts[0]
    f = acts[1]
    g = acts[2]
    o = acts[3]
    cn = load32(SV + 8 * H + n, m)
    gc = load32(EX + 12 * H + n, m)
    tn = tanh(gc * cn + load32(EX + 13 * H + n, m))
    dn = dh * o * (1.0 - tn * tn)  # dL/dLN(c̃)
    _accumulate(DEX + 12 * H + n, dn * cn, m)
    _accumulate(DEX + 13 * H + n, dn, m)
    dy = dn * gc
    rc = tl.load(SV + 9 * H + 2).to(tl.float32)
    dck = rc * (dy - row_sum(dy) / H - cn * (row_sum(dy * cn) / H)) + dc  # dL/dc̃_t
    da, dct, dkm = gate_backward(acts, cp, dck, dh, tn, ms, SM)
    xn = ()
    hn = ()
    dyx = ()
    dyh = ()
    for k in tl.static_range(4):
        xk = load32(SV + k * H + n, m)
        hk = load32(SV + (4 + k) * H + n, m)
        _accumulate(DEX + k * H + n, da[k], m)
        _accumulate(DEX + (4 + k) * H + n, da[k] * xk, m)
        _accumulate(DEX + (8 + k) * H + n, da[k] * hk, m)
        xn = xn + (xk,)
        hn = hn + (hk,)
        dyx = dyx + (da[k] * load32(EX + (4 + k) * H + n, m),)
        dyh = dyh + (da[k] * load32(EX + (8 + k) * H + n, m),)
    dgx = _ln4_backward(dyx, xn, tl.load(SV + 9 * H).to(tl.float32), H)
    dgh = _ln4_backward(dyh, hn, tl.load(SV + 9 * H + 1).to(tl.float32), H)
    # no direct path into h_{t-1}; dL/dc_{t-1} = dL/du ⊙ f; dL/dm^g = dL/du ⊙ i ⊙ g, with
    # u = f ⊙ c_{t-1} + i ⊙ g ⊙ m^g (c̃ = u without a cell mask)
    dms = put(put(ms, CANDIDATE, dct * i * g), CELL, dkm)
    return dgx, dgh, zeros_like(dh), dct * f, o * tn, dms
