r"""The LSTM cell: torch's parameter layout, fused op, and the loop path's per-step math.

Hochreiter & Schmidhuber 1997, with the forget gate of Gers et al. 2000, in torch's gate
order i, f, g, o. One step with every mask the loop path carries::

    a      = xp_t + (h_{t-1} ⊙ m^h_t) W_hhᵀ          xp_t = x_t W_ihᵀ + b_ih + b_hh
    i, f, o = σ(a_i), σ(a_f), σ(a_o);  g = tanh(a_g)
    c̃_t   = m^c_t ⊙ (f ⊙ c_{t-1} + i ⊙ (g ⊙ m^g_t))  m^g: candidate mask (Semeniuta et al. 2016)
    h̃_t   = o ⊙ tanh(c̃_t)                           m^c: cell mask (Moon et al. 2015)
    c_t    = z^c_t ⊙ c_{t-1} + (1 - z^c_t) ⊙ c̃_t        zoneout (Krueger et al. 2016); z = 0 off
    h_t    = z^h_t ⊙ h_{t-1} + (1 - z^h_t) ⊙ h̃_t

``m^h`` is the recurrent mask (Gal & Ghahramani 2016), one per gate block of ``W_hh`` when
untied. :func:`step_forward` / :func:`step_backward` are the reference every loop backend
is tested against; ``rnndrop/kernels/cpp/loop.cpp`` has the same math in C++.
"""

from __future__ import annotations

import warnings

import torch
from torch import _VF, Tensor

from ...kernels.contract import LayerMasks, Saved, State
from .base import Cell, needs_opaque

__all__ = ["LSTM_CELL"]


# no torch.compiler.disable: dynamo records aten.lstm (torch.export strict, 0 graph breaks
# under torch.compile); vmap has no rule for it, so torch.func runs the loop (RNNBase)
def _fused(x, batch_sizes, state, weights, has_bias, num_layers, train, bidir, batch_first):
    """The fused ATen/cuDNN LSTM op, with nn.LSTM's arguments; returns (out, (h, c))."""
    if torch.compiler.is_compiling():  # dynamo cannot trace catch_warnings; no cuDNN copy
        args = (x, batch_sizes, state, weights, has_bias, num_layers, train, bidir, batch_first)
        return _opaque(*args) if needs_opaque(x, *state, *weights) else _call(*args)
    with warnings.catch_warnings():
        # cuDNN copies weights that are not views of one buffer (dropped weights never
        # are); the copy is what weight drop needs, so its warning says nothing here
        warnings.filterwarnings("ignore", message="RNN module weights are not part")
        return _call(x, batch_sizes, state, weights, has_bias, num_layers, train, bidir,
                     batch_first)  # fmt: skip


def _call(x, batch_sizes, state, weights, has_bias, num_layers, train, bidir, batch_first):
    if batch_sizes is None:
        out, h, c = _VF.lstm(x, state, weights, has_bias, num_layers, 0.0, train, bidir,
                             batch_first)  # fmt: skip
    else:
        out, h, c = _VF.lstm(x, batch_sizes, state, weights, has_bias, num_layers, 0.0, train,
                             bidir)  # fmt: skip
    return out, (h, c)


# torch.compile with gradients: inductor cannot run the fused op's training form
# (aten.mkldnn_rnn_layer), so that one call stays out of the graph (a graph break)
_opaque = torch.compiler.disable(_call)


def step_forward(a: Tensor, rec: None, prev: State, m: LayerMasks,
                 out: Saved | None = None) -> State:  # fmt: skip
    """One step: ``a`` ``(B, 4H)`` pre-activations (recurrent product added) -> ``(h_t, c_t)``.

    ``m``: the step's masks (``candidate``, ``cell``, ``zoneout_h``, ``zoneout_c``); ``rec`` unused
    (the loop adds the recurrent product into ``a``). In the loop (``out``: the step's
    :class:`Saved` rows) ``a`` becomes the activations in place and ``c̃_t`` is saved where
    zoneout needs it; with ``out=None`` every op is out of place (autograd: step cells).
    """
    H = prev.c.shape[-1]
    if out is None:
        i, f, g, o = a.chunk(4, 1)
        i, f, g, o = i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()
    else:  # one sigmoid over i, f and one over o, written into the saved activations
        a[:, 2 * H : 3 * H].tanh_()
        a[:, : 2 * H].sigmoid_()
        a[:, 3 * H :].sigmoid_()
        i, f, g, o = a.chunk(4, 1)
    gm = g if m.candidate is None else g * m.candidate
    ct = torch.addcmul(f * prev.c, i, gm)
    if m.cell is not None:
        ct = ct * m.cell
    h = o * ct.tanh()
    c = ct if m.zoneout_c is None else torch.lerp(ct, prev.c, m.zoneout_c)
    if m.zoneout_h is not None:
        h = torch.lerp(h, prev.h, m.zoneout_h)
    if out is not None and out.ct_seq is not None:
        out.ct_seq.copy_(ct)
    return State(h, c)


def step_backward(d: State, prev: State, s: Saved, m: LayerMasks, dgx: Tensor, dgh: Tensor,
                  dm: LayerMasks | None = None) -> State:  # fmt: skip
    """Backward of :func:`step_forward`.

    ``d`` = ``(dL/dh_t, dL/dc_t)`` (all paths). Writes dL/d(pre-activations) into ``dgx``
    (the same buffer as ``dgh``: both sides of the LSTM's gates see the same gradient).
    Returns ``(zoneout's carry into h_{t-1} or None, dL/dc_{t-1})``. ``dm``: None, or
    ``(B, H)`` buffers (a field None if not wanted) for the gradients of this step's masks
    (concrete dropout)::

        dL/dm^g = dL/dc̃ ⊙ m^c ⊙ i ⊙ g,  dL/dm^c = dL/dc̃ ⊙ (f ⊙ c_{t-1} + i ⊙ g ⊙ m^g),
        dL/dz^h = dL/dh_t ⊙ (h_{t-1} − h̃_t),  dL/dz^c = dL/dc_t ⊙ (c_{t-1} − c̃_t)
    """
    o = s.acts.chunk(4, 1)[3]
    zh, zc = m.zoneout_h, m.zoneout_c
    ct = s.c_seq if s.ct_seq is None else s.ct_seq  # c̃_t: c_t unless zoneout mixed it
    dht = d.h if zh is None else d.h * (1 - zh)
    dcn = d.c if zc is None else d.c * (1 - zc)
    tc = ct.tanh()
    dcn = dcn + dht * o * (1 - tc * tc)  # dL/dc̃_t
    return gate_backward(d, prev, s, m, dgx, dm, dcn, dht, tc)


def gate_backward(d: State, prev: State, s: Saved, m: LayerMasks, dgx: Tensor,
                  dm: LayerMasks | None, dct: Tensor, dht: Tensor,
                  tc: Tensor) -> State:  # fmt: skip
    """The gates' share of an LSTM step's backward, shared with the LayerNorm LSTM: from
    ``dct`` = dL/dc̃_t (every path), ``dht`` = dL/dh̃_t and ``tc``, the value ``o`` multiplies
    in ``h̃_t`` (``tanh(c̃_t)``, or ``tanh(LN(c̃_t))``), writes dL/d(the four pre-activations)
    into ``dgx`` and this step's mask gradients into ``dm``; returns :func:`step_backward`'s
    ``(zoneout's carry into h_{t-1} or None, dL/dc_{t-1})``."""
    i, f, g, o = s.acts.chunk(4, 1)
    zh, zc, cm, km = m.zoneout_h, m.zoneout_c, m.candidate, m.cell
    gm = g if cm is None else g * cm
    if km is not None:
        if dm is not None and dm.cell is not None:  # the unmasked c̃ is recomputed
            torch.mul(dct, torch.addcmul(f * prev.c, i, gm), out=dm.cell)
        dct = dct * km  # dL/d(f ⊙ c_{t-1} + i ⊙ g ⊙ m^g)
    dg = dct * i if cm is None else dct * i * cm
    gi, gf, gg, go = dgx.chunk(4, 1)
    torch.mul(dct * gm, i * (1 - i), out=gi)
    torch.mul(dct * prev.c, f * (1 - f), out=gf)
    torch.mul(dg, 1 - g * g, out=gg)
    torch.mul(dht * tc, o * (1 - o), out=go)
    if dm is not None:
        if dm.candidate is not None:
            torch.mul(dct * i, g, out=dm.candidate)
        if dm.zoneout_h is not None:
            torch.mul(d.h, prev.h - o * tc, out=dm.zoneout_h)
        if dm.zoneout_c is not None:
            ct = s.c_seq if s.ct_seq is None else s.ct_seq
            torch.mul(d.c, prev.c - ct, out=dm.zoneout_c)
    dc_prev = dct * f if zc is None else dct * f + d.c * zc
    return State(None if zh is None else d.h * zh, dc_prev)


def reference_step(xp: Tensor, rec: Tensor, h: Tensor, c: Tensor, m: LayerMasks,
                   params: tuple[Tensor, ...] = ()) -> tuple[Tensor, Tensor]:  # fmt: skip
    """The plain-autograd loop's step (:mod:`rnndrop.kernels.reference`): ``(h̃_t, c_t)``.

    :func:`step_forward`'s math in out-of-place ops that every exporter records (zoneout
    written out, not ``lerp``); ``xp`` the input projection, ``rec`` the recurrent product,
    ``m`` the step's masks but zoneout on ``h`` (the loop applies it, after ``W_hr`` with a
    projection). ``params`` unused (torch's LSTM has none of its own).
    """
    H = c.shape[-1]  # h has P units with a projection
    a = xp + rec  # gates i, f, g, o
    i = torch.sigmoid(a[:, :H])
    f = torch.sigmoid(a[:, H : 2 * H])
    g = torch.tanh(a[:, 2 * H : 3 * H])
    o = torch.sigmoid(a[:, 3 * H :])
    if m.candidate is not None:
        g = g * m.candidate
    ct = f * c + i * g
    if m.cell is not None:
        ct = ct * m.cell
    h_new = o * torch.tanh(ct)
    return h_new, ct if m.zoneout_c is None else ct + m.zoneout_c * (c - ct)


def _split_bias(b_ih: Tensor, b_hh: Tensor) -> tuple[Tensor, None]:
    return b_ih + b_hh, None


LSTM_CELL = Cell(
    name="lstm",
    mode="LSTM",
    gates=4,
    gate_names=("i", "f", "g", "o"),
    has_cell=True,
    split_recurrent=False,
    fused=_fused,
    split_bias=_split_bias,
    step_forward=step_forward,
    step_backward=step_backward,
    reference_step=reference_step,
)
