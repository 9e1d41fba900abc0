r"""The LSTM's pointwise math for the ``triton`` kernels (the contract: ``_kernels.py``).

Hochreiter & Schmidhuber 1997, torch's gate order i, f, g, o; the step of
:mod:`rnndrop.nn.cells.lstm` without zoneout (the loops apply it)::

    i, f, o = σ(a_i), σ(a_f), σ(a_o);  g = tanh(a_g)     a = xp_t + (h_{t-1} ⊙ m^h_t) W_hhᵀ
    c̃_t   = m^c_t ⊙ (f ⊙ c_{t-1} + i ⊙ (g ⊙ m^g_t))     m^g: candidate mask
    h̃_t   = o ⊙ tanh(c̃_t)                              m^c: cell mask (Moon et al.)
"""

import triton.language as tl

from ._kernels import sigmoid, tanh, zeros_like


def forward(xs, ps, h, c, cm, km, HAS_CM: tl.constexpr, HAS_KM: tl.constexpr):
    """xs: the four pre-activations (recurrent product added); ps unused."""
    i = sigmoid(xs[0])
    f = sigmoid(xs[1])
    g = tanh(xs[2])
    o = sigmoid(xs[3])
    gm = g
    if HAS_CM:
        gm = g * cm
    ct = f * c + i * gm
    if HAS_KM:
        ct = ct * km
    return (i, f, g, o), o * tanh(ct), ct, ct


def backward(acts, aux, hp, cp, ct, dh, dc, cm, km, HAS_CM: tl.constexpr,
             HAS_KM: tl.constexpr):  # fmt: skip
    """dc: dL/dc̃_t from later steps; adds the path through h̃_t = o ⊙ tanh(c̃_t)."""
    i = acts[0]
    f = acts[1]
    g = acts[2]
    o = acts[3]
    tc = tanh(ct)
    dct = dc + dh * o * (1.0 - tc * tc)  # dL/dc̃_t
    gm = g
    if HAS_CM:
        gm = g * cm
    dc = dct
    dkm = dct
    if HAS_KM:  # dL/dm^c = dL/dc̃ ⊙ (the unmasked c̃); dc becomes dL/d(that)
        dkm = dct * (f * cp + i * gm)
        dc = dct * km
    dgg = dc * i
    if HAS_CM:
        dgg = dc * i * cm
    dg = (dc * gm * (i * (1.0 - i)), dc * cp * (f * (1.0 - f)), dgg * (1.0 - g * g),
          dh * tc * (o * (1.0 - o)))  # fmt: skip
    # no direct path into h_{t-1}; dL/dc_{t-1} = dL/du ⊙ f; dL/dm^g = dL/du ⊙ i ⊙ g, with
    # u = f ⊙ c_{t-1} + i ⊙ g ⊙ m^g (c̃ = u without a cell mask)
    return dg, dg, zeros_like(dh), dc * f, o * tc, dc * i * g, dkm
