r"""The GRU's pointwise math for the ``triton`` kernels (the contract: ``_kernels.py``).

Cho et al. 2014 in torch's form and gate order r, z, n; the step of
:mod:`rnndrop.nn.cells.gru` without zoneout (the loops apply it)::

    r, z = σ(xp_r + hp_r), σ(xp_z + hp_z)        hp_t = (h_{t-1} ⊙ m^h_t) W_hhᵀ + b_hh
    n    = tanh(xp_n + r ⊙ hp_n)
    h̃_t = (1 - z) ⊙ (n ⊙ m^n_t) + z ⊙ h_{t-1}    m^n: candidate mask

A split cell: ``ps`` holds ``hp_t`` per gate, and ``hp_n`` is saved for backward (``aux``).
"""

from ._kernels import CANDIDATE, put, sigmoid, tanh

STEP_MASKS = ("candidate",)  # the step masks it reads (the loop applies zoneout on h)


def forward(xs, ps, h, c, ms, SM):
    """c: no cell state, never read."""
    r = sigmoid(xs[0] + ps[0])
    z = sigmoid(xs[1] + ps[1])
    n = tanh(xs[2] + r * ps[2])
    nm = n
    if SM[CANDIDATE] is not None:
        nm = n * ms[CANDIDATE]
    return (r, z, n), nm + z * (h - nm), c, ps[2]


def backward(acts, aux, hp, cp, ct, dh, dc, ms, SM):
    """aux: hp_n; dL/dhp differs from dL/dxp in the n block only (gn ⊙ r)."""
    r = acts[0]
    z = acts[1]
    n = acts[2]
    nm = n
    dn = dh * (1.0 - z)
    if SM[CANDIDATE] is not None:
        nm = n * ms[CANDIDATE]
        dn = dh * (1.0 - z) * ms[CANDIDATE]
    gn = dn * (1.0 - n * n)
    gr = gn * aux * (r * (1.0 - r))
    gz = dh * (hp - nm) * (z * (1.0 - z))
    # z ⊙ h_{t-1} carries straight into h_{t-1}; dL/dm^n = dL/dh̃ ⊙ (1 - z) ⊙ n
    return ((gr, gz, gn), (gr, gz, gn * r), dh * z, dc, nm + z * (hp - nm),
            put(ms, CANDIDATE, dh * (1.0 - z) * n))  # fmt: skip
