"""The ``python`` loop backend: the reference time loop and backprop through time.

Generic over the cell: the loop, the recurrent masks and GEMMs, and every weight gradient
are written once here; the pointwise math of one step is the cell's ``step_forward`` /
``step_backward`` (:mod:`rnndrop.nn.cells`). Runs on every device and dtype. What made it
fast: the input projection of all steps in one GEMM, preallocated
``(T, B, ·)`` buffers written in place, no autograd node per step, and every weight
gradient as one GEMM over all ``T·B`` rows.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .contract import Grads, LayerInputs, LayerMasks, Saved, State

__all__ = [
    "PythonBackend",
    "input_mask_grad",
    "loop_mask_grads",
    "mask_grad_buffers",
    "project",
    "sum_to",
]


def _at(m: Tensor | None, t: int) -> Tensor | None:
    if m is None:
        return None
    return m[0] if m.shape[0] == 1 else m[t]


def project(x: Tensor, w_ih: Tensor, bias: Tensor | None, in_mask: Tensor | None) -> Tensor:
    """``x W_ihᵀ + b`` for all steps; per gate ``(x ⊙ m_k) W_ih,kᵀ`` with untied input masks."""
    if in_mask is None:
        acts = torch.nn.functional.linear(x, w_ih)
    else:
        G = in_mask.shape[0]
        H = w_ih.shape[0] // G
        acts = torch.cat([(x * in_mask[k]) @ w_ih[k * H : (k + 1) * H].t() for k in range(G)], -1)
    return acts if bias is None else acts.add_(bias)


def _recurrent_gemm(out: Tensor, hm: Tensor, w_hh: Tensor, accumulate: bool,
                    bias: Tensor | None = None) -> None:  # fmt: skip
    """``out (+)= hm W_hhᵀ (+ bias)``, with ``hm`` (Gr, B, H): one GEMM, or for Gr > 1 one
    strided batched GEMM (a block of W_hh per gate group)."""
    if hm.shape[0] == 1:
        if accumulate:
            out.addmm_(hm[0], w_hh.t())
        elif bias is not None:
            torch.addmm(bias, hm[0], w_hh.t(), out=out)
            return
        else:
            torch.mm(hm[0], w_hh.t(), out=out)
    else:
        Gr, B, H = hm.shape
        # into the (Gr, B, H) view of out's gate blocks (row stride Gr·H), instead of a GEMM
        # per gate block; beta 0 ignores what out held
        out.view(B, Gr, H).transpose(0, 1).baddbmm_(hm, w_hh.view(Gr, H, H).transpose(1, 2),
                                                    beta=1 if accumulate else 0)  # fmt: skip
    if bias is not None:
        out.add_(bias)


def sum_to(t: Tensor, shape: tuple[int, ...] | torch.Size) -> Tensor:
    """``t`` summed over the dims where ``shape`` is 1: the gradient of a broadcast mask."""
    dims = [i for i, (a, b) in enumerate(zip(t.shape, shape, strict=True)) if b == 1 and a != 1]
    return t.sum(dims, keepdim=True) if dims else t


def _need(need_masks: tuple[bool, ...]) -> dict[str, bool]:
    """``need_masks`` (one flag per :class:`LayerMasks` field, missing ones False) by name."""
    return {name: bool(n) for name, n in zip(LayerMasks.names(), need_masks, strict=False)}


def input_mask_grad(inp: LayerInputs, dgx: Tensor) -> Tensor:
    """Gradient of the untied input masks ``(G, Tm, B|1, I)``: ``Σ (dgx_k W_ih,k) ⊙ x``.

    They act on the input projection's GEMM, before the loop, so every backend gets it from
    the gate gradients it returns (``dgx`` (T, B, G·H) = dL/d(input projection)).
    """
    m = inp.masks.input
    G = m.shape[0]
    H = dgx.shape[-1] // G
    return torch.stack([
        sum_to((dgx[..., k * H : (k + 1) * H] @ inp.w_ih[k * H : (k + 1) * H]) * inp.x,
               m.shape[1:])
        for k in range(G)
    ])  # fmt: skip


def loop_mask_grads(
    inp: LayerInputs, dgx: Tensor, need_masks: tuple[bool, ...], per_step: LayerMasks
) -> LayerMasks:
    """``Grads.dmasks`` from what a loop wrote per step, summed to the masks' shapes.

    ``per_step``: :func:`mask_grad_buffers` as the loop filled them (recurrent: dL/d(masked
    h_{t-1}) ⊙ h_{t-1}; the step masks: what the cell's ``step_backward`` wrote), None
    where not asked for; the untied input masks' gradient comes from ``dgx``
    (:func:`input_mask_grad`).
    """
    m, need = inp.masks, _need(need_masks)
    out = LayerMasks()
    for name in LayerMasks.names():
        mask, d = getattr(m, name), getattr(per_step, name)
        if mask is None or not need.get(name):
            continue
        if LayerMasks.where(name) == "projection":
            setattr(out, name, input_mask_grad(inp, dgx))
        elif d is not None:
            setattr(out, name, sum_to(d, mask.shape))
    return out


def mask_grad_buffers(inp: LayerInputs, T: int, need_masks: tuple[bool, ...],
                      like: Tensor) -> LayerMasks:  # fmt: skip
    """Per-step buffers for the gradients of the masks applied in the loop: for each mask
    that acts in the loop (recurrent ``(T, Gr, B, H)``, the step masks ``(T, B, H)``: its
    shape with ``T`` steps and ``B`` rows), None where a mask is absent or its gradient not
    asked for."""
    m, need = inp.masks, _need(need_masks)
    B, H = inp.h0.shape
    out = LayerMasks()
    for name in LayerMasks.names():
        mask = getattr(m, name)
        if mask is not None and need.get(name) and LayerMasks.where(name) != "projection":
            setattr(out, name, like.new_empty(T, *mask.shape[1:-2], B, H))
    return out


def gather_dh(carry: Tensor, dh: Tensor | None, dh_rec: Tensor | None,
              m_next: Tensor | None) -> Tensor:  # fmt: skip
    """dL/dh_t = ``carry + dh + Σ_k dh_rec_k ⊙ m_next_k`` (see ``_step_backward``)."""
    d = carry if dh is None else carry + dh
    if dh_rec is not None:
        d = d + (dh_rec if m_next is None else dh_rec * m_next).sum(0)
    return d


def _order(T: int, reverse: bool, backward: bool = False) -> range:
    forward_in_time = reverse == backward
    return range(T) if forward_in_time else range(T - 1, -1, -1)


class PythonBackend:
    """The reference backend (runs everywhere)."""

    name = "python"

    def unavailable(self, inputs: LayerInputs) -> str | None:
        return None

    def forward(self, inp: LayerInputs) -> Saved:
        x = inp.x
        acts = x.clone() if inp.w_ih is None else project(x, inp.w_ih, inp.b_x, inp.masks.input)
        return self._loop(inp, acts)

    def _loop(self, inp: LayerInputs, acts: Tensor) -> Saved:
        """The time loop, from the input projection ``acts`` (overwritten with activations)."""
        cell, m, x = inp.cell, inp.masks, inp.x
        T, B = x.shape[:2]
        H = inp.w_hh.shape[1]
        new = x.new_empty
        h_seq = new(T, B, H)
        c_seq = new(T, B, H) if cell.has_cell else None
        ct_seq = new(T, B, H) if m.zoneout_c is not None else None
        hm_seq = new(m.recurrent.shape[1], T, B, H) if m.recurrent is not None else None
        W = cell.saved_width(H) if cell.saved_width is not None else 0
        hn_seq = new(T, B, H) if cell.split_recurrent and not W else None  # the GRU's
        ex_seq = new(T, B, W) if W else None  # a cell's own saved rows (Saved.extra)
        kw = {"params": inp.extra} if inp.extra else {}  # a cell's own parameters
        rec = new(B, cell.gates * H) if cell.split_recurrent else None
        saved = Saved(acts, h_seq, c_seq, ct_seq, hm_seq, hn_seq, ex_seq)
        prev = State(inp.h0, inp.c0)
        order = _order(T, inp.reverse)
        ready = False  # whether the previous step already wrote this step's masked h_{t-1}
        for i, t in enumerate(order):
            step = m.at(t)
            if hm_seq is None:
                hm = prev.h.unsqueeze(0)
            elif ready:
                hm = hm_seq[:, t]
            else:
                hm = torch.mul(prev.h.unsqueeze(0), step.recurrent, out=hm_seq[:, t])
            nxt = None  # where the next step's masked h_t goes, and its mask
            if hm_seq is not None and i + 1 < T:
                nxt = (hm_seq[:, order[i + 1]], _at(m.recurrent, order[i + 1]))
            if rec is None:  # the recurrent product goes straight into the gates
                _recurrent_gemm(acts[t], hm, inp.w_hh, accumulate=True)
            else:
                _recurrent_gemm(rec, hm, inp.w_hh, accumulate=False, bias=inp.b_h)
            out = saved.at(t)
            ready = self._step_forward(cell, rec, prev, step, out, nxt, **kw)
            prev = State(out.h_seq, out.c_seq)
        return saved

    @staticmethod
    def _step_forward(cell, rec, prev: State, m: LayerMasks, out: Saved, nxt, **kw) -> bool:
        """The pointwise math of one step (the cell's ``step_forward``) into the step's
        :class:`Saved` rows ``out`` (``out.acts`` holds the pre-activations).

        The seam where the ``triton`` backend's step path puts one fused kernel. ``nxt``:
        None, or ``(hm_out, mask)`` ``(Gr, B, H)``: the next step's masked ``h_t``, which a
        backend may write (returning True) so that the loop need not. ``kw``: ``params``
        (``LayerInputs.extra``) for a cell that has them.
        """
        new = cell.step_forward(out.acts, rec, prev, m, out, **kw)
        out.h_seq.copy_(new.h)
        if out.c_seq is not None:
            out.c_seq.copy_(new.c)
        return False

    def backward(self, inp, s: Saved, dh_seq, dc_last, need_x, need_w, need_masks=()) -> Grads:
        need = tuple(need_masks)
        dgx, dgh, dh0, dc0, per_step, *dextra = self._bptt(inp, s, dh_seq, dc_last, need)
        return self._grads(inp, s, dgx, dgh, dh0, dc0, per_step, need_x, need_w, need,
                           *dextra)  # fmt: skip

    @classmethod
    def _grads(cls, inp, s: Saved, dgx, dgh, dh0, dc0, per_step, need_x, need_w,
               need_masks, dextra=None) -> Grads:  # fmt: skip
        """:class:`Grads` from what backprop through time gave (the gate gradients, ``dh0``,
        ``dc0``, the per-step mask gradients, a cell's own parameters' gradients): every
        weight and input gradient as GEMMs over all ``T·B`` rows, and the masks' gradients
        where asked for. Every backend's tail."""
        T, B, GH = s.acts.shape
        g = Grads(dh0=dh0, dc0=dc0, dextra=dextra)
        if need_w:
            g.dw_hh = cls._weight_hh_grad(dgh, inp.h0, s, inp.reverse)
            if inp.b_h is not None:
                g.db_h = dgh.reshape(T * B, GH).sum(0)
        cls._input_grads(g, inp, dgx, need_x, need_w)
        if any(need_masks):
            g.dmasks = loop_mask_grads(inp, dgx, need_masks, per_step)
        return g

    def _bptt(self, inp, s: Saved, dh_seq, dc_last, need: tuple[bool, ...]) -> tuple:
        """Backprop through time: ``(dgx, dgh, dh0, dc0, per-step mask gradients)``, and for
        a cell with its own parameters their gradients (a sixth item)."""
        cell, m = inp.cell, inp.masks
        T, B = s.acts.shape[:2]
        H = inp.w_hh.shape[1]
        # a cell's own parameters: their gradients summed over steps per batch row
        acc = tuple(p.new_zeros(B, p.numel()) for p in inp.extra)
        kw = {"params": inp.extra, "dparams": acc} if acc else {}
        dm_seq = mask_grad_buffers(inp, T, need, s.acts)  # concrete dropout
        drec_seq = dm_seq.recurrent  # the loop's; the cell writes the step masks'
        step_dm = any(getattr(dm_seq, name) is not None for name in LayerMasks.names()
                      if LayerMasks.where(name) == "step")  # fmt: skip
        dgx = torch.empty_like(s.acts)
        dgh = torch.empty_like(s.acts) if cell.split_recurrent else dgx
        carry = s.acts.new_zeros(B, H)
        dc = None
        if cell.has_cell:
            dc = dc_last if dc_last is not None else torch.zeros_like(inp.c0)
        dh_rec, m_next = None, None  # dL/d(masked h_t) from the step after t, and its mask
        first = T - 1 if inp.reverse else 0
        for t in _order(T, inp.reverse, backward=True):
            # dL/dh_t = carry + dh_seq[t] + Σ_k dh_rec_k ⊙ m_next_k, summed by the step
            d = (carry, None if dh_seq is None else dh_seq[t], dh_rec, m_next)
            tp = t + 1 if inp.reverse else t - 1
            prev = State(inp.h0, inp.c0) if t == first else State(
                s.h_seq[tp], None if s.c_seq is None else s.c_seq[tp])  # fmt: skip
            step = m.at(t)
            carry, dc = self._step_backward(cell, d, dc, prev, s.at(t), step, dgx[t], dgh[t],
                                            dm_seq.at(t) if step_dm else None, **kw)  # fmt: skip
            if carry is None:
                carry = torch.zeros_like(prev.h)
            dh_rec = self._recurrent_grad(dgh[t], inp.w_hh, 1 if m.recurrent is None else
                                          m.recurrent.shape[1])  # fmt: skip
            if drec_seq is not None:  # dL/dm^h_t = dL/d(masked h_{t-1}) ⊙ h_{t-1}
                torch.mul(dh_rec, prev.h, out=drec_seq[t])
            m_next = step.recurrent
        dh0 = gather_dh(carry, None, dh_rec, m_next)
        if acc:
            return dgx, dgh, dh0, dc, dm_seq, tuple(a.sum(0) for a in acc)
        return dgx, dgh, dh0, dc, dm_seq

    @staticmethod
    def _step_backward(cell, d, dc, prev: State, s: Saved, m: LayerMasks, dgx, dgh,
                       dm: LayerMasks | None, **kw) -> State:  # fmt: skip
        """Backward of :meth:`_step_forward`: the cell's ``step_backward`` (``dm`` None
        unless a mask's gradient is wanted). Returns ``(carry, dc_prev)``.

        ``d`` = ``(carry, dh, dh_rec, m_next)``, the parts of dL/dh_t: the direct gradient
        from step t+1 (zoneout's and the GRU's carry), the output's gradient (or None), and
        ``(Gr, B, H)`` dL/d(masked h_t) per gate group from step t+1's recurrent GEMM with
        that step's recurrent mask (None before the first step, or without a mask); ``dc``
        dL/dc_t. ``s``, ``m``: the step's :class:`Saved` rows and masks. ``kw``: ``params``
        and ``dparams`` for a cell with its own parameters.
        """
        return cell.step_backward(State(gather_dh(*d), dc), prev, s, m, dgx, dgh, dm, **kw)

    @staticmethod
    def _recurrent_grad(dg: Tensor, w_hh: Tensor, Gr: int) -> Tensor:
        """dL/d(masked h_{t-1}) per gate group: ``(Gr, B, H)``, one GEMM (or batched GEMM)."""
        if Gr == 1:
            return (dg @ w_hh).unsqueeze(0)
        B, H = dg.shape[0], w_hh.shape[1]
        # (Gr, B, H) views with row stride Gr·H: a strided batched GEMM, no copy
        return torch.bmm(dg.view(B, Gr, H).transpose(0, 1), w_hh.view(Gr, H, H))

    @staticmethod
    def _weight_hh_grad(dgh: Tensor, h0: Tensor, s: Saved, reverse: bool) -> Tensor:
        """dL/dW_hh = Σ_t dghᵀ_t (masked h_{t-1}): one GEMM over all T·B rows per gate group."""
        T, B, GH = dgh.shape
        H = h0.shape[-1]
        if s.hm_seq is None:
            h = s.h_seq
            prev = torch.cat([h[1:], h0[None]]) if reverse else torch.cat([h0[None], h[:-1]])
            return dgh.reshape(T * B, GH).t() @ prev.reshape(T * B, H)
        Gr = s.hm_seq.shape[0]
        if Gr == 1:
            return dgh.reshape(T * B, GH).t() @ s.hm_seq[0].reshape(T * B, H)
        dg = dgh.reshape(T * B, Gr, H)
        return torch.cat([dg[:, k].t() @ s.hm_seq[k].reshape(T * B, H) for k in range(Gr)])

    @staticmethod
    def _input_grads(g: Grads, inp: LayerInputs, dgx: Tensor, need_x: bool, need_w: bool):
        x, w_ih, in_mask = inp.x, inp.w_ih, inp.masks.input
        T, B, GH = dgx.shape
        if w_ih is None:
            g.dx = dgx
            return
        dg2 = dgx.view(T * B, GH)
        if in_mask is None:
            g.dx = (dg2 @ w_ih).view_as(x) if need_x else None
            g.dw_ih = dg2.t() @ x.reshape(T * B, -1) if need_w else None
        else:  # gate k saw x ⊙ m_k
            G = in_mask.shape[0]
            H = GH // G
            blocks = [slice(k * H, (k + 1) * H) for k in range(G)]
            if need_x:
                g.dx = sum((dg2[:, b] @ w_ih[b]).view_as(x) * in_mask[k]
                           for k, b in enumerate(blocks))  # fmt: skip
            if need_w:
                xs = [(x * in_mask[k]).reshape(T * B, -1) for k in range(G)]
                g.dw_ih = torch.cat([dg2[:, b].t() @ xs[k] for k, b in enumerate(blocks)])
        if need_w and inp.b_x is not None:
            g.db_x = dg2.sum(0)
