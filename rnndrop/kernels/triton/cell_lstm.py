r"""The LSTM's pointwise math for the ``triton`` kernels (the contract: ``_kernels.py``).

Hochreiter & Schmidhuber 1997, torch's gate order i, f, g, o; the step of
:mod:`rnndrop.nn.cells.lstm` without zoneout (the loops apply it)::

    i, f, o = σ(a_i), σ(a_f), σ(a_o);  g = tanh(a_g)     a = xp_t + (h_{t-1} ⊙ m^h_t) W_hhᵀ
    c̃_t   = m^c_t ⊙ (f ⊙ c_{t-1} + i ⊙ (g ⊙ m^g_t))     m^g: candidate mask
    h̃_t   = o ⊙ tanh(c̃_t)                              m^c: cell mask (Moon et al.)
"""

from ._kernels import CANDIDATE, CELL, put, sigmoid, tanh, zeros_like

STEP_MASKS = ("candidate", "cell")  # the step masks it reads (the loops apply zoneout)


def forward(xs, ps, h, c, ms, SM):
    """xs: the four pre-activations (recurrent product added); ps unused."""
    i = sigmoid(xs[0])
    f = sigmoid(xs[1])
    g = tanh(xs[2])
    o = sigmoid(xs[3])
    gm = g
    if SM[CANDIDATE] is not None:
        gm = g * ms[CANDIDATE]
    ct = f * c + i * gm
    if SM[CELL] is not None:
        ct = ct * ms[CELL]
    return (i, f, g, o), o * tanh(ct), ct, ct


def gate_backward(acts, cp, dck, dh, tc, ms, SM):
    """The gates' share of an LSTM step's backward, shared with the LayerNorm LSTM: from
    dck = dL/dc̃_t (every path) and tc, the value o multiplies in h̃_t (tanh(c̃_t), or
    tanh(LN(c̃_t))), to dL/da (the four pre-activations), dL/du and dL/dm^c, with
    u = f ⊙ c_{t-1} + i ⊙ g ⊙ m^g the unmasked c̃ (c̃ = u without a cell mask)."""
    i = acts[0]
    f = acts[1]
    g = acts[2]
    o = acts[3]
    gm = g
    if SM[CANDIDATE] is not None:
        gm = g * ms[CANDIDATE]
    du = dck
    dkm = dck
    if SM[CELL] is not None:  # dL/dm^c = dL/dc̃ ⊙ u; du becomes dL/du
        dkm = dck * (f * cp + i * gm)
        du = dck * ms[CELL]
    dgg = du * i
    if SM[CANDIDATE] is not None:
        dgg = du * i * ms[CANDIDATE]
    da = (du * gm * (i * (1.0 - i)), du * cp * (f * (1.0 - f)), dgg * (1.0 - g * g),
          dh * tc * (o * (1.0 - o)))  # fmt: skip
    return da, du, dkm


def backward(acts, aux, hp, cp, ct, dh, dc, ms, SM):
    """dc: dL/dc̃_t from later steps; adds the path through h̃_t = o ⊙ tanh(c̃_t)."""
    tc = tanh(ct)
    dct = dc + dh * acts[3] * (1.0 - tc * tc)  # dL/dc̃_t
    dg, du, dkm = gate_backward(acts, cp, dct, dh, tc, ms, SM)
    # no direct path into h_{t-1}; dL/dc_{t-1} = dL/du ⊙ f; dL/dm^g = dL/du ⊙ i ⊙ g
    dms = put(put(ms, CANDIDATE, du * acts[0] * acts[2]), CELL, dkm)
    return dg, dg, zeros_like(dh), du * acts[1], acts[3] * tc, dms
