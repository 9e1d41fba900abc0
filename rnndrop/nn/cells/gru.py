r"""The GRU cell: torch's parameter layout, fused op, and the loop path's per-step math.

Cho et al. 2014, in torch's form and gate order r, z, n. One step with every mask the loop
path carries::

    xp_t   = x_t W_ihᵀ + b_ih                          (one GEMM for all steps)
    hp_t   = (h_{t-1} ⊙ m^h_t) W_hhᵀ + b_hh             m^h: recurrent mask, per gate if untied
    r, z   = σ(xp_r + hp_r), σ(xp_z + hp_z)
    n      = tanh(xp_n + r ⊙ hp_n)                     hp_n = W_hn (h ⊙ m^h_n) + b_hn
    h̃_t   = (1 - z) ⊙ (n ⊙ m^n_t) + z ⊙ h_{t-1}       m^n: candidate mask (Semeniuta et al. 2016)
    h_t    = z^h_t ⊙ h_{t-1} + (1 - z^h_t) ⊙ h̃_t        zoneout on h (Krueger et al. 2016)

The recurrent mask acts where ``h_{t-1}`` enters ``W_h*`` (Gal & Ghahramani 2016 describe
it for the GRU); the carry ``z ⊙ h_{t-1}`` sees the unmasked state, as the LSTM's ``c_{t-1}`` does.
A GRU has no cell state: ``zoneout_cell`` means nothing for it. :func:`step_forward` /
:func:`step_backward` are the reference the loop backends are tested against.
"""

from __future__ import annotations

import warnings

import torch
from torch import _VF, Tensor

from ...kernels.contract import LayerMasks, Saved, State
from .base import Cell, needs_opaque

__all__ = ["GRU_CELL"]


# traced by dynamo as aten.gru (see the LSTM's _fused)
def _fused(x, batch_sizes, state, weights, has_bias, num_layers, train, bidir, batch_first):
    """The fused ATen/cuDNN GRU op, with nn.GRU's arguments; returns (out, (h,))."""
    if torch.compiler.is_compiling():  # dynamo cannot trace catch_warnings; no cuDNN copy
        args = (x, batch_sizes, state, weights, has_bias, num_layers, train, bidir, batch_first)
        return _opaque(*args) if needs_opaque(x, *state, *weights) else _call(*args)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="RNN module weights are not part")
        return _call(x, batch_sizes, state, weights, has_bias, num_layers, train, bidir,
                     batch_first)  # fmt: skip


def _call(x, batch_sizes, state, weights, has_bias, num_layers, train, bidir, batch_first):
    if batch_sizes is None:
        out, h = _VF.gru(x, state[0], weights, has_bias, num_layers, 0.0, train, bidir,
                         batch_first)  # fmt: skip
    else:
        out, h = _VF.gru(x, batch_sizes, state[0], weights, has_bias, num_layers, 0.0, train,
                         bidir)  # fmt: skip
    return out, (h,)


# torch.compile with gradients: inductor cannot run the fused op's training form
# (aten.mkldnn_rnn_layer), so that one call stays out of the graph (a graph break)
_opaque = torch.compiler.disable(_call)


def step_forward(a: Tensor, rec: Tensor, prev: State, m: LayerMasks,
                 out: Saved | None = None) -> State:  # fmt: skip
    """One step: ``a`` ``(B, 3H)`` input projections, ``rec`` ``(B, 3H)`` = ``hp_t`` (bias
    included) -> ``(h_t, None)``.

    ``m``: the step's masks (``candidate``, ``zoneout_h``). In the loop (``out``: the
    step's :class:`Saved` rows) ``a`` becomes the activations r, z, n in place and
    ``hp_n`` is saved into ``out.hn_seq`` for backward; with ``out=None`` every op is out
    of place (autograd: step cells).
    """
    H = prev.h.shape[-1]
    if out is None:  # chunk, not slices: autograd gathers a chunk's gradients in one cat
        (ar, az, an), (hr, hz, hn) = a.chunk(3, 1), rec.chunk(3, 1)
        r, z = (ar + hr).sigmoid(), (az + hz).sigmoid()
        n = (an + r * hn).tanh()
    else:
        a[:, : 2 * H].add_(rec[:, : 2 * H]).sigmoid_()
        r, z, n = a.chunk(3, 1)
        out.hn_seq.copy_(rec[:, 2 * H :])
        n.addcmul_(r, out.hn_seq).tanh_()
    nm = n if m.candidate is None else n * m.candidate
    h = torch.addcmul(nm, z, prev.h - nm)  # (1 - z) ⊙ n + z ⊙ h
    if m.zoneout_h is not None:
        h = torch.lerp(h, prev.h, m.zoneout_h)
    return State(h)


def step_backward(d: State, prev: State, s: Saved, m: LayerMasks, dgx: Tensor, dgh: Tensor,
                  dm: LayerMasks | None = None) -> State:  # fmt: skip
    """Backward of :func:`step_forward`.

    ``d.h`` is dL/dh_t (all paths). Writes dL/d(xp_t) into ``dgx`` and dL/d(hp_t) into
    ``dgh`` (they differ in the n block: ``hp_n`` enters through ``r``). Returns the direct
    gradient into ``h_{t-1}`` (the ``z`` carry and zoneout's) and None (no cell state).
    ``dm``: None, or ``(B, H)`` buffers (a field None if not wanted) for the gradients of
    the candidate and zoneout masks (concrete dropout): ``dL/dm^n = dL/dh̃ ⊙ (1 − z) ⊙ n``,
    ``dL/dz^h = dL/dh_t ⊙ (h_{t-1} − h̃_t)``.
    """
    r, z, n = s.acts.chunk(3, 1)
    h_prev, zh, cm, hn = prev.h, m.zoneout_h, m.candidate, s.hn_seq
    dht = d.h if zh is None else d.h * (1 - zh)
    nm = n if cm is None else n * cm
    dn = dht * (1 - z) if cm is None else dht * (1 - z) * cm
    gr, gz, gn = dgx.chunk(3, 1)
    torch.mul(dn, 1 - n * n, out=gn)
    torch.mul(gn * hn, r * (1 - r), out=gr)
    torch.mul(dht * (h_prev - nm), z * (1 - z), out=gz)
    hr, hz, hn_ = dgh.chunk(3, 1)
    hr.copy_(gr)
    hz.copy_(gz)
    torch.mul(gn, r, out=hn_)
    if dm is not None:
        if dm.candidate is not None:
            torch.mul(dht * (1 - z), n, out=dm.candidate)
        if dm.zoneout_h is not None:
            torch.mul(d.h, h_prev - torch.addcmul(nm, z, h_prev - nm), out=dm.zoneout_h)
    carry = dht * z if zh is None else dht * z + d.h * zh
    return State(carry)


def reference_step(xp: Tensor, rec: Tensor, h: Tensor, c: None, m: LayerMasks,
                   params: tuple[Tensor, ...] = ()) -> tuple[Tensor, None]:  # fmt: skip
    """The plain-autograd loop's step (:mod:`rnndrop.kernels.reference`): ``(h̃_t, None)``.

    :func:`step_forward`'s math in out-of-place ops; ``xp`` the input projection, ``rec`` =
    ``hp_t`` (``b_hh`` included, so that it stays inside ``r ⊙ (W_hn h + b_hn)``), ``m`` the
    step's masks but zoneout on ``h`` (the loop applies it). ``c``, ``params`` unused.
    """
    H = h.shape[-1]  # gates r, z, n
    r = torch.sigmoid(xp[:, :H] + rec[:, :H])
    z = torch.sigmoid(xp[:, H : 2 * H] + rec[:, H : 2 * H])
    n = torch.tanh(xp[:, 2 * H :] + r * rec[:, 2 * H :])
    if m.candidate is not None:
        n = n * m.candidate
    return n + z * (h - n), None


def _split_bias(b_ih: Tensor, b_hh: Tensor) -> tuple[Tensor, Tensor]:
    return b_ih, b_hh


GRU_CELL = Cell(
    name="gru",
    mode="GRU",
    gates=3,
    gate_names=("r", "z", "n"),
    has_cell=False,
    split_recurrent=True,
    fused=_fused,
    split_bias=_split_bias,
    step_forward=step_forward,
    step_backward=step_backward,
    reference_step=reference_step,
)
