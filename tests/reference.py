"""Independent, deliberately plain LSTM, GRU, Elman RNN and LayerNorm LSTM with dropout (the
sites of :class:`rnndrop.config.RecurrentDropout`, torch's GRU and RNN equations, haste's
LayerNorm LSTM).

It shares no code with rnndrop's RNNs: one autograd-tracked Python step per time step,
masks taken from what the module recorded (``record_masks``) or, without sampling,
the expectations each site's scaling implies. Tests compare the module (fused and loop
paths, C++ and PyTorch loops) against it, outputs and gradients.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _expectation(cfg, site: str) -> float:
    """What a site multiplies by when masks are not sampled."""
    p = getattr(cfg, site)
    return 1.0 - p if cfg.scaling == "classic" and p > 0 else 1.0


def reference_lstm(lstm, x: Tensor, hx=None, masks: dict | None = None, sample: bool = True):
    """Run ``lstm``'s parameters and scheme by the book.

    Args:
        lstm: an ``rnndrop.nn.LSTM`` (only its parameters and config are read).
        x: ``(T, B, I)`` time-major input.
        hx: optional ``(h0, c0)``.
        masks: the module's ``last_masks`` from the forward being checked (``sample``).
        sample: masks were sampled (training / MC) or not (deterministic eval).

    Returns:
        ``output (T, B, D·H)``, ``(h_n, c_n)``, ``pre_dropout_output``.
    """
    cfg = lstm.dropout
    masks = masks or {}
    T, B, _ = x.shape
    L, D, H = lstm.num_layers, lstm.num_directions, lstm.hidden_size
    P = getattr(lstm, "proj_size", 0) or H  # features of h (torch's LSTM with projections)
    if hx is None:
        h0 = x.new_zeros(L * D, B, P)
        c0 = x.new_zeros(L * D, B, H)
    else:
        h0, c0 = hx
    layer_in = x
    h_n, c_n = [], []
    for layer in range(L):
        site = "input" if layer == 0 else "between_layers"
        m_in = masks.get(f"{site}/l{layer}") if sample else None
        tied_in = m_in is not None and cfg.tied
        if tied_in:
            layer_in = layer_in * m_in
        elif not sample:
            layer_in = layer_in * _expectation(cfg, site)
        outs = []
        for d in range(D):
            sfx = f"_l{layer}" + ("_reverse" if d else "")
            w_ih = getattr(lstm, "weight_ih" + sfx)
            w_hh = getattr(lstm, "weight_hh" + sfx)
            b = (
                (getattr(lstm, "bias_ih" + sfx) + getattr(lstm, "bias_hh" + sfx))
                if lstm.bias
                else 0
            )
            key = f"/l{layer}" + ("_reverse" if d else "")
            if sample:
                w_hh = w_hh * masks["weight_hh" + key] if ("weight_hh" + key) in masks else w_hh
                rec = masks.get("recurrent" + key)
                cand = masks.get("candidate" + key)
                cmask = masks.get("cell" + key)  # (T|1, B|1, H)
                zh = masks.get("zoneout_hidden" + key)
                zc = masks.get("zoneout_cell" + key)
            else:
                w_hh = w_hh * _expectation(cfg, "weight_hh") * _expectation(cfg, "recurrent")
                rec = None
                cand = _expectation(cfg, "candidate")
                cmask = _expectation(cfg, "cell")
                zh, zc = cfg.zoneout_hidden, cfg.zoneout_cell
            h, c = h0[layer * D + d], c0[layer * D + d]
            steps = range(T - 1, -1, -1) if d else range(T)
            out_t = [None] * T
            for t in steps:
                xt = layer_in[t]
                if m_in is not None and not tied_in:  # untied: one input mask per gate
                    xg = [xt * m_in[k, min(t, m_in.shape[1] - 1)] for k in range(4)]
                else:
                    xg = [xt] * 4
                if rec is None:
                    hg = [h] * 4
                else:
                    r = rec[min(t, rec.shape[0] - 1)]
                    hg = [h * r[min(k, r.shape[0] - 1)] for k in range(4)]
                pre = [
                    xg[k] @ w_ih[k * H : (k + 1) * H].t() + hg[k] @ w_hh[k * H : (k + 1) * H].t()
                    for k in range(4)
                ]
                pre = torch.cat(pre, -1) + b
                i, f, g, o = pre.chunk(4, -1)
                i, f, g, o = i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()
                if isinstance(cand, Tensor):
                    g = g * cand[min(t, cand.shape[0] - 1)]
                elif cand is not None:
                    g = g * cand
                ct = f * c + i * g
                if cmask is not None:  # Moon et al.: the masked c̃ is carried and read
                    ct = ct * (_at(cmask, t) if isinstance(cmask, Tensor) else cmask)
                ht = o * ct.tanh()
                if P != H:  # h_t = W_hr (o ⊙ tanh c_t)
                    ht = ht @ getattr(lstm, "weight_hr" + sfx).t()
                zct = zc[t] if isinstance(zc, Tensor) else zc
                zht = zh[t] if isinstance(zh, Tensor) else zh
                c = zct * c + (1 - zct) * ct if zc is not None else ct
                h = zht * h + (1 - zht) * ht if zh is not None else ht
                out_t[t] = h
            outs.append(torch.stack(out_t))
            h_n.append(h)
            c_n.append(c)
        layer_in = torch.cat(outs, -1)
    pre = layer_in
    if sample and "output" in masks:
        out = pre * masks["output"]
    else:
        out = pre * (_expectation(cfg, "output") if not sample else 1.0)
    return out, (torch.stack(h_n), torch.stack(c_n)), pre


def _at(mask: Tensor, t: int, dim: int = 0) -> Tensor:
    """Step ``t`` of a mask along ``dim``, or its only entry if it is shared over time."""
    return mask.select(dim, min(t, mask.shape[dim] - 1))


def reference_gru(gru, x: Tensor, hx=None, masks: dict | None = None, sample: bool = True):
    """Run ``gru``'s parameters and scheme by the book (torch's GRU equations, r, z, n).

    One step, with every mask at its site::

        r = σ(W_ir (x ⊙ m^x_r) + b_ir + W_hr (h ⊙ m^h_r) + b_hr)
        z = σ(W_iz (x ⊙ m^x_z) + b_iz + W_hz (h ⊙ m^h_z) + b_hz)
        n = tanh(W_in (x ⊙ m^x_n) + b_in + r ⊙ (W_hn (h ⊙ m^h_n) + b_hn))
        h̃ = (1 - z) ⊙ (n ⊙ m^n) + z ⊙ h          (the carry sees the unmasked h)
        h' = d ⊙ h + (1 - d) ⊙ h̃                 (zoneout on h)

    with ``W_hh`` times the weight-drop mask. Tied input masks act on ``x`` once.

    Args:
        gru: an ``rnndrop.nn.GRU`` (only its parameters and config are read).
        x: ``(T, B, I)`` time-major input.
        hx: optional ``h0`` ``(L·D, B, H)``.
        masks: the module's ``last_masks`` from the forward being checked (``sample``).
        sample: masks were sampled (training / MC) or not (deterministic eval).

    Returns:
        ``output (T, B, D·H)``, ``h_n``, ``pre_dropout_output``.
    """
    cfg = gru.dropout
    masks = masks or {}
    T, B, _ = x.shape
    L, D, H = gru.num_layers, gru.num_directions, gru.hidden_size
    h0 = x.new_zeros(L * D, B, H) if hx is None else hx
    layer_in = x
    h_n = []
    for layer in range(L):
        site = "input" if layer == 0 else "between_layers"
        m_in = masks.get(f"{site}/l{layer}") if sample else None
        tied_in = m_in is not None and cfg.tied
        if tied_in:
            layer_in = layer_in * m_in
        elif not sample:
            layer_in = layer_in * _expectation(cfg, site)
        outs = []
        for d in range(D):
            sfx = f"_l{layer}" + ("_reverse" if d else "")
            w_ih = getattr(gru, "weight_ih" + sfx)
            w_hh = getattr(gru, "weight_hh" + sfx)
            if gru.bias:
                b_ih, b_hh = getattr(gru, "bias_ih" + sfx), getattr(gru, "bias_hh" + sfx)
            else:
                b_ih = b_hh = x.new_zeros(3 * H)
            key = f"/l{layer}" + ("_reverse" if d else "")
            if sample:
                w_hh = w_hh * masks["weight_hh" + key] if ("weight_hh" + key) in masks else w_hh
                rec = masks.get("recurrent" + key)  # (T|1, 1|3, B|1, H)
                cand = masks.get("candidate" + key)  # (T|1, B|1, H)
                zh = masks.get("zoneout_hidden" + key)  # (T, B, H), 1 = keep previous
            else:
                w_hh = w_hh * _expectation(cfg, "weight_hh") * _expectation(cfg, "recurrent")
                rec = None
                cand = _expectation(cfg, "candidate")
                zh = cfg.zoneout_hidden or None
            h = h0[layer * D + d]
            steps = range(T - 1, -1, -1) if d else range(T)
            out_t = [None] * T
            for t in steps:
                xt = layer_in[t]
                if m_in is not None and not tied_in:  # untied: one input mask per gate
                    xg = [xt * _at(m_in[k], t) for k in range(3)]
                else:
                    xg = [xt] * 3
                if rec is None:
                    hg = [h] * 3
                else:
                    r_t = _at(rec, t)  # (1|3, B|1, H)
                    hg = [h * r_t[min(k, r_t.shape[0] - 1)] for k in range(3)]
                gx = [xg[k] @ w_ih[k * H : (k + 1) * H].t() + b_ih[k * H : (k + 1) * H]
                      for k in range(3)]  # fmt: skip
                gh = [hg[k] @ w_hh[k * H : (k + 1) * H].t() + b_hh[k * H : (k + 1) * H]
                      for k in range(3)]  # fmt: skip
                r = torch.sigmoid(gx[0] + gh[0])
                z = torch.sigmoid(gx[1] + gh[1])
                n = torch.tanh(gx[2] + r * gh[2])
                if isinstance(cand, Tensor):
                    n = n * _at(cand, t)
                elif cand is not None:
                    n = n * cand
                ht = (1 - z) * n + z * h
                if zh is not None:
                    d_t = _at(zh, t) if isinstance(zh, Tensor) else zh
                    ht = d_t * h + (1 - d_t) * ht
                h = ht
                out_t[t] = h
            outs.append(torch.stack(out_t))
            h_n.append(h)
        layer_in = torch.cat(outs, -1)
    pre = layer_in
    if sample and "output" in masks:
        out = pre * masks["output"]
    else:
        out = pre * (_expectation(cfg, "output") if not sample else 1.0)
    return out, torch.stack(h_n), pre


def reference_rnn(rnn, x: Tensor, hx=None, masks: dict | None = None, sample: bool = True):
    """Run an Elman RNN's parameters and scheme by the book (torch's ``nn.RNN`` equations).

    One step, with every mask at its site::

        h̃ = φ(W_ih (x ⊙ m^x) + b_ih + (W_hh ⊙ M^w) (h ⊙ m^h) + b_hh),   φ = tanh | relu
        h' = z ⊙ h + (1 - z) ⊙ h̃                                         (zoneout on h)

    Tied input masks act on ``x`` once; untied ones (one gate block) per step.

    Args:
        rnn: an ``rnndrop.nn.RNN`` (only its parameters, nonlinearity and config are read).
        x: ``(T, B, I)`` time-major input.
        hx: optional ``h0`` ``(L·D, B, H)``.
        masks: the module's ``last_masks`` from the forward being checked (``sample``).
        sample: masks were sampled (training / MC) or not (deterministic eval).

    Returns:
        ``output (T, B, D·H)``, ``h_n``, ``pre_dropout_output``.
    """
    cfg = rnn.dropout
    masks = masks or {}
    phi = torch.relu if rnn.nonlinearity == "relu" else torch.tanh
    T, B, _ = x.shape
    L, D, H = rnn.num_layers, rnn.num_directions, rnn.hidden_size
    h0 = x.new_zeros(L * D, B, H) if hx is None else hx
    layer_in = x
    h_n = []
    for layer in range(L):
        site = "input" if layer == 0 else "between_layers"
        m_in = masks.get(f"{site}/l{layer}") if sample else None
        tied_in = m_in is not None and cfg.tied
        if tied_in:
            layer_in = layer_in * m_in
        elif not sample:
            layer_in = layer_in * _expectation(cfg, site)
        outs = []
        for d in range(D):
            sfx = f"_l{layer}" + ("_reverse" if d else "")
            w_ih = getattr(rnn, "weight_ih" + sfx)
            w_hh = getattr(rnn, "weight_hh" + sfx)
            b = getattr(rnn, "bias_ih" + sfx) + getattr(rnn, "bias_hh" + sfx) if rnn.bias else 0
            key = f"/l{layer}" + ("_reverse" if d else "")
            if sample:
                w_hh = w_hh * masks["weight_hh" + key] if ("weight_hh" + key) in masks else w_hh
                rec = masks.get("recurrent" + key)  # (T|1, 1, B|1, H)
                zh = masks.get("zoneout_hidden" + key)  # (T, B, H), 1 = keep previous
            else:
                w_hh = w_hh * _expectation(cfg, "weight_hh") * _expectation(cfg, "recurrent")
                rec = None
                zh = cfg.zoneout_hidden or None
            h = h0[layer * D + d]
            out_t = [None] * T
            for t in range(T - 1, -1, -1) if d else range(T):
                xt = layer_in[t]
                if m_in is not None and not tied_in:  # untied: the one gate block's mask
                    xt = xt * _at(m_in[0], t)
                hm = h if rec is None else h * _at(rec, t)[0]
                ht = phi(xt @ w_ih.t() + hm @ w_hh.t() + b)
                if zh is not None:
                    z = _at(zh, t) if isinstance(zh, Tensor) else zh
                    ht = z * h + (1 - z) * ht
                h = ht
                out_t[t] = h
            outs.append(torch.stack(out_t))
            h_n.append(h)
        layer_in = torch.cat(outs, -1)
    pre = layer_in
    if sample and "output" in masks:
        out = pre * masks["output"]
    else:
        out = pre * (_expectation(cfg, "output") if not sample else 1.0)
    return out, torch.stack(h_n), pre


def _layer_norm(v: Tensor, gain: Tensor, shift: Tensor | None = None) -> Tensor:
    """By hand: ``gain ⊙ (v - mean) / sqrt(var + 1e-5) + shift`` over the last dim, with the
    biased variance (Ba et al. 2016; haste)."""
    centred = v - v.sum(-1, keepdim=True) / v.shape[-1]
    var = (centred * centred).sum(-1, keepdim=True) / v.shape[-1]
    out = gain * centred / torch.sqrt(var + 1e-5)
    return out if shift is None else out + shift


def reference_layernorm_lstm(lstm, x: Tensor, hx=None, masks: dict | None = None,
                             sample: bool = True):  # fmt: skip
    """Run a LayerNorm LSTM's parameters and scheme by the book (haste's equations, gates
    i, f, g, o). One step, with every mask at its site::

        a  = LN(W_ih (x ⊙ m^x); γ_x) + LN((W_hh ⊙ M^w)(h ⊙ m^h); γ_h) + b_ih + b_hh
        c̃ = m^c ⊙ (σ(a_f) ⊙ c + σ(a_i) ⊙ (tanh(a_g) ⊙ m^g))
        h̃ = σ(a_o) ⊙ tanh(LN(c̃; γ_c, β_c))
        c' = z^c ⊙ c + (1 - z^c) ⊙ c̃,  h' = z^h ⊙ h + (1 - z^h) ⊙ h̃

    ``LN`` runs over the whole ``4H`` gate vector (untied masks act per gate block before
    it) and over the ``H`` cell units.

    Args:
        lstm: an ``rnndrop.nn.LayerNormLSTM`` (only its parameters and config are read).
        x: ``(T, B, I)`` time-major input.
        hx: optional ``(h0, c0)``.
        masks: the module's ``last_masks`` from the forward being checked (``sample``).
        sample: masks were sampled (training / MC) or not (deterministic eval).

    Returns:
        ``output (T, B, D·H)``, ``(h_n, c_n)``, ``pre_dropout_output``.
    """
    cfg = lstm.dropout
    masks = masks or {}
    T, B, _ = x.shape
    L, D, H = lstm.num_layers, lstm.num_directions, lstm.hidden_size
    if hx is None:
        h0 = c0 = x.new_zeros(L * D, B, H)
    else:
        h0, c0 = hx
    layer_in = x
    h_n, c_n = [], []
    for layer in range(L):
        site = "input" if layer == 0 else "between_layers"
        m_in = masks.get(f"{site}/l{layer}") if sample else None
        tied_in = m_in is not None and cfg.tied
        if tied_in:
            layer_in = layer_in * m_in
        elif not sample:
            layer_in = layer_in * _expectation(cfg, site)
        outs = []
        for d in range(D):
            sfx = f"_l{layer}" + ("_reverse" if d else "")
            p = {n: getattr(lstm, n + sfx) for n in ("weight_ih", "weight_hh", "gamma_ih",
                                                     "gamma_hh", "gamma_c", "beta_c")}  # fmt: skip
            w_ih, w_hh = p["weight_ih"], p["weight_hh"]
            b = getattr(lstm, "bias_ih" + sfx) + getattr(lstm, "bias_hh" + sfx) if lstm.bias else 0
            key = f"/l{layer}" + ("_reverse" if d else "")
            if sample:
                w_hh = w_hh * masks["weight_hh" + key] if ("weight_hh" + key) in masks else w_hh
                rec = masks.get("recurrent" + key)  # (T|1, 1|4, B|1, H)
                cand = masks.get("candidate" + key)
                cmask = masks.get("cell" + key)  # (T|1, B|1, H)
                zh = masks.get("zoneout_hidden" + key)  # (T, B, H), 1 = keep previous
                zc = masks.get("zoneout_cell" + key)
            else:
                w_hh = w_hh * _expectation(cfg, "weight_hh") * _expectation(cfg, "recurrent")
                rec = None
                cand = _expectation(cfg, "candidate")
                cmask = _expectation(cfg, "cell")
                zh, zc = cfg.zoneout_hidden or None, cfg.zoneout_cell or None
            h, c = h0[layer * D + d], c0[layer * D + d]
            out_t = [None] * T
            for t in range(T - 1, -1, -1) if d else range(T):
                xt = layer_in[t]
                if m_in is not None and not tied_in:  # untied: one input mask per gate
                    xg = [xt * _at(m_in[k], t) for k in range(4)]
                else:
                    xg = [xt] * 4
                if rec is None:
                    hg = [h] * 4
                else:
                    r_t = _at(rec, t)  # (1|4, B|1, H)
                    hg = [h * r_t[min(k, r_t.shape[0] - 1)] for k in range(4)]
                wx = torch.cat([xg[k] @ w_ih[k * H : (k + 1) * H].t() for k in range(4)], -1)
                wh = torch.cat([hg[k] @ w_hh[k * H : (k + 1) * H].t() for k in range(4)], -1)
                a = _layer_norm(wx, p["gamma_ih"]) + _layer_norm(wh, p["gamma_hh"]) + b
                i, f = torch.sigmoid(a[:, :H]), torch.sigmoid(a[:, H : 2 * H])
                g, o = torch.tanh(a[:, 2 * H : 3 * H]), torch.sigmoid(a[:, 3 * H :])
                if isinstance(cand, Tensor):
                    g = g * _at(cand, t)
                elif cand is not None:
                    g = g * cand
                ct = f * c + i * g
                if cmask is not None:  # Moon et al.: the masked c̃ is carried and read
                    ct = ct * (_at(cmask, t) if isinstance(cmask, Tensor) else cmask)
                ht = o * torch.tanh(_layer_norm(ct, p["gamma_c"], p["beta_c"]))
                if zc is not None:
                    z = _at(zc, t) if isinstance(zc, Tensor) else zc
                    ct = z * c + (1 - z) * ct
                if zh is not None:
                    z = _at(zh, t) if isinstance(zh, Tensor) else zh
                    ht = z * h + (1 - z) * ht
                h, c = ht, ct
                out_t[t] = h
            outs.append(torch.stack(out_t))
            h_n.append(h)
            c_n.append(c)
        layer_in = torch.cat(outs, -1)
    pre = layer_in
    if sample and "output" in masks:
        out = pre * masks["output"]
    else:
        out = pre * (_expectation(cfg, "output") if not sample else 1.0)
    return out, (torch.stack(h_n), torch.stack(c_n)), pre
