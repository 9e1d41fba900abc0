"""Triton kernels of the ``triton`` loop backend: the whole time loop of one layer in one launch.

The functions here are plain Python; :mod:`rnndrop.kernels.triton` wraps them as compiled
``JITFunction`` s (CUDA) or as ``InterpretedFunction`` s (``TRITON_INTERPRET=1``, CPU) when
first used. Triton picks between the two when its ``@triton.jit`` decorator runs, reading
``TRITON_INTERPRET`` at that moment, so they carry no decorator: the adapter decides per call.

Design (issue 11, hidden sizes up to ``MAX_H``): each program owns ``BB`` rows of the batch
and runs every time step; ``h`` (and ``c``) stay in registers between steps, and each step
re-reads the ``W_hh`` gate tiles (from L2 on a GPU) for one ``tl.dot`` per gate. The masks
come in as tensors (the engine draws and records them); a stride of 0 broadcasts a mask that
is shared over time, gates or batch. Backward is the same loop in reverse: it writes the
gradients of the gate pre-activations and ``dh0`` / ``dc0``; the weight and input gradients
are GEMMs over all ``T·B`` rows done by the adapter outside the kernel.

Designed around the interpreter's limits:
- no ``libdevice``: ``tanh(x)`` is written ``2σ(2x) − 1`` and ``σ(x)`` as ``1 / (1 + exp(−x))``;
- no bf16 ``tl.dot``: the kernels run float32 only (the adapter refuses other dtypes);
- no grid-wide barrier (programs run one after another, a barrier would deadlock): no
  program ever reads what another writes; each owns its batch rows for the whole sequence;
- ``tl.dot`` on fp32 defaults to TF32 on a GPU: every dot passes ``input_precision="ieee"``;
- one kernel, no ``@triton.jit`` helpers (a helper would have to be jitted in the same mode
  as its caller), hence the gates written out one by one;
- no function of Triton's standard library that is itself ``@jit`` (``tl.zeros``,
  ``tl.sigmoid``, ...): those were decorated at ``import triton`` - which torch's dynamo does
  early, before a test can set ``TRITON_INTERPRET`` - and a compiled-mode one raises "Cannot
  call @triton.jit'd outside of the scope of a kernel" in the interpreter. Only builtins
  (``tl.full``, ``tl.exp``, ``tl.dot``, ``tl.where``, ...) appear here.
Padded rows (``b ≥ B``) and columns (``n ≥ H``) load as 0 and stay 0 through every step.
"""

import triton.language as tl


def lstm_fwd(
    ACT, W, H0, C0, RM, CM, ZH, ZC, HSEQ, CSEQ, CTSEQ, HMSEQ,
    T, B, H,
    rm_t, rm_g, rm_b, rm_h, cm_t, cm_b, cm_h, zh_t, zh_b, zh_h, zc_t, zc_b, zc_h,
    HAS_RM: tl.constexpr, GR: tl.constexpr, HAS_CM: tl.constexpr, HAS_ZH: tl.constexpr,
    HAS_ZC: tl.constexpr, REVERSE: tl.constexpr, BB: tl.constexpr, BH: tl.constexpr,
):  # fmt: skip
    """ACT (T, B, 4H) holds the input projection; overwritten with the activations i, f, g, o."""
    pid = tl.program_id(0)
    rb = pid * BB + tl.arange(0, BB)
    rn = tl.arange(0, BH)
    mb = rb < B
    mn = rn < H
    m2 = mb[:, None] & mn[None, :]
    bh = rb[:, None] * H + rn[None, :]
    GH = 4 * H
    ba = rb[:, None] * GH + rn[None, :]
    # gate tile k, transposed: Wt_k[j, n] = W[k·H + n, j] (rows: h's features, the dot's K)
    wmask = mn[:, None] & mn[None, :]
    woff = rn[None, :] * H + rn[:, None]
    HH = H * H
    TBH = T * B * H
    h = tl.load(H0 + bh, mask=m2, other=0.0)
    c = tl.load(C0 + bh, mask=m2, other=0.0)
    for s in range(T):
        t = T - 1 - s if REVERSE else s
        hm0 = h
        hm1 = h
        hm2 = h
        hm3 = h
        if HAS_RM:
            rmo = RM + t * rm_t + rb[:, None] * rm_b + rn[None, :] * rm_h
            hmo = HMSEQ + t * B * H + bh
            hm0 = h * tl.load(rmo, mask=m2, other=0.0)
            tl.store(hmo, hm0, mask=m2)
            if GR > 1:
                hm1 = h * tl.load(rmo + rm_g, mask=m2, other=0.0)
                hm2 = h * tl.load(rmo + 2 * rm_g, mask=m2, other=0.0)
                hm3 = h * tl.load(rmo + 3 * rm_g, mask=m2, other=0.0)
                tl.store(hmo + TBH, hm1, mask=m2)
                tl.store(hmo + 2 * TBH, hm2, mask=m2)
                tl.store(hmo + 3 * TBH, hm3, mask=m2)
            else:
                hm1 = hm0
                hm2 = hm0
                hm3 = hm0
        a = ACT + t * B * GH + ba
        ai = tl.load(a, mask=m2, other=0.0) + tl.dot(
            hm0, tl.load(W + woff, mask=wmask, other=0.0), input_precision="ieee"
        )
        af = tl.load(a + H, mask=m2, other=0.0) + tl.dot(
            hm1, tl.load(W + HH + woff, mask=wmask, other=0.0), input_precision="ieee"
        )
        ag = tl.load(a + 2 * H, mask=m2, other=0.0) + tl.dot(
            hm2, tl.load(W + 2 * HH + woff, mask=wmask, other=0.0), input_precision="ieee"
        )
        ao = tl.load(a + 3 * H, mask=m2, other=0.0) + tl.dot(
            hm3, tl.load(W + 3 * HH + woff, mask=wmask, other=0.0), input_precision="ieee"
        )
        i = 1.0 / (1.0 + tl.exp(-ai))
        f = 1.0 / (1.0 + tl.exp(-af))
        g = 2.0 / (1.0 + tl.exp(-2.0 * ag)) - 1.0  # tanh without libdevice
        o = 1.0 / (1.0 + tl.exp(-ao))
        tl.store(a, i, mask=m2)
        tl.store(a + H, f, mask=m2)
        tl.store(a + 2 * H, g, mask=m2)
        tl.store(a + 3 * H, o, mask=m2)
        gm = g
        if HAS_CM:
            gm = g * tl.load(CM + t * cm_t + rb[:, None] * cm_b + rn[None, :] * cm_h,
                             mask=m2, other=0.0)  # fmt: skip
        ct = f * c + i * gm
        hn = o * (2.0 / (1.0 + tl.exp(-2.0 * ct)) - 1.0)
        cn = ct
        if HAS_ZC:
            zc = tl.load(ZC + t * zc_t + rb[:, None] * zc_b + rn[None, :] * zc_h,
                         mask=m2, other=0.0)  # fmt: skip
            cn = ct + zc * (c - ct)
            tl.store(CTSEQ + t * B * H + bh, ct, mask=m2)
        if HAS_ZH:
            zh = tl.load(ZH + t * zh_t + rb[:, None] * zh_b + rn[None, :] * zh_h,
                         mask=m2, other=0.0)  # fmt: skip
            hn = hn + zh * (h - hn)
        tl.store(HSEQ + t * B * H + bh, hn, mask=m2)
        tl.store(CSEQ + t * B * H + bh, cn, mask=m2)
        h = hn
        c = cn


def lstm_bwd(
    ACT, W, C0, CSEQ, CTSEQ, RM, CM, ZH, ZC, DHSEQ, DCLAST, DG, DH0, DC0,
    H0, HSEQ, DRM, DCM, DZH, DZC,
    T, B, H,
    rm_t, rm_g, rm_b, rm_h, cm_t, cm_b, cm_h, zh_t, zh_b, zh_h, zc_t, zc_b, zc_h,
    HAS_RM: tl.constexpr, GR: tl.constexpr, HAS_CM: tl.constexpr, HAS_ZH: tl.constexpr,
    HAS_ZC: tl.constexpr, HAS_DH: tl.constexpr, REVERSE: tl.constexpr,
    BB: tl.constexpr, BH: tl.constexpr, MG: tl.constexpr,
):  # fmt: skip
    """Backprop through time: DG (T, B, 4H) dL/d(pre-activations); DH0, DC0 (B, H).

    With MG (concrete dropout) also the per-step gradients of the masks applied in the loop:
    DRM (T, GR, B, H) dL/d(recurrent mask) = dL/d(masked h_{t-1}) ⊙ h_{t-1}; (T, B, H):
    DCM dL/d(candidate mask) = dL/dc̃ ⊙ i ⊙ g, DZH dL/dz_h = dL/dh_t ⊙ (h_{t-1} − h̃_t),
    DZC dL/dz_c = dL/dc_t ⊙ (c_{t-1} − c̃_t); each only where its mask is (HAS_*).
    """
    pid = tl.program_id(0)
    rb = pid * BB + tl.arange(0, BB)
    rn = tl.arange(0, BH)
    mb = rb < B
    mn = rn < H
    m2 = mb[:, None] & mn[None, :]
    bh = rb[:, None] * H + rn[None, :]
    GH = 4 * H
    ba = rb[:, None] * GH + rn[None, :]
    # gate tile k: W_k[n, j] = W[k·H + n, j]; dL/d(masked h) = dg_k @ W_k
    wmask = mn[:, None] & mn[None, :]
    woff = rn[:, None] * H + rn[None, :]
    HH = H * H
    c0 = tl.load(C0 + bh, mask=m2, other=0.0)
    dc = tl.load(DCLAST + bh, mask=m2, other=0.0)
    dhr = tl.full((BB, BH), 0.0, tl.float32)  # into h_t through step t+1's recurrence
    carry = tl.full((BB, BH), 0.0, tl.float32)  # into h_t directly (zoneout's carry)
    for s in range(T):
        if REVERSE:  # backward runs against the direction of the forward loop
            t = s
            first = t == T - 1
            tp = tl.minimum(t + 1, T - 1)
        else:
            t = T - 1 - s
            first = t == 0
            tp = tl.maximum(t - 1, 0)
        d = carry + dhr
        if HAS_DH:
            d = d + tl.load(DHSEQ + t * B * H + bh, mask=m2, other=0.0)
        cp = tl.where(first, c0, tl.load(CSEQ + tp * B * H + bh, mask=m2, other=0.0))
        if HAS_ZC:
            ctv = tl.load(CTSEQ + t * B * H + bh, mask=m2, other=0.0)
        else:
            ctv = tl.load(CSEQ + t * B * H + bh, mask=m2, other=0.0)
        a = ACT + t * B * GH + ba
        i = tl.load(a, mask=m2, other=0.0)
        f = tl.load(a + H, mask=m2, other=0.0)
        g = tl.load(a + 2 * H, mask=m2, other=0.0)
        o = tl.load(a + 3 * H, mask=m2, other=0.0)
        dht = d
        carry = tl.full((BB, BH), 0.0, tl.float32)
        if HAS_ZH:
            zh = tl.load(ZH + t * zh_t + rb[:, None] * zh_b + rn[None, :] * zh_h,
                         mask=m2, other=0.0)  # fmt: skip
            dht = d * (1.0 - zh)
            carry = d * zh
        dcn = dc
        if HAS_ZC:
            zc = tl.load(ZC + t * zc_t + rb[:, None] * zc_b + rn[None, :] * zc_h,
                         mask=m2, other=0.0)  # fmt: skip
            dcn = dc * (1.0 - zc)
        tc = 2.0 / (1.0 + tl.exp(-2.0 * ctv)) - 1.0
        dcn = dcn + dht * o * (1.0 - tc * tc)
        gm = g
        dgg = dcn * i
        if HAS_CM:
            cm = tl.load(CM + t * cm_t + rb[:, None] * cm_b + rn[None, :] * cm_h,
                         mask=m2, other=0.0)  # fmt: skip
            gm = g * cm
            dgg = dcn * i * cm
        gi = dcn * gm * (i * (1.0 - i))
        gf = dcn * cp * (f * (1.0 - f))
        gg = dgg * (1.0 - g * g)
        go = dht * tc * (o * (1.0 - o))
        hpv = dc  # h_{t-1}, loaded only for the mask gradients
        if MG:
            hpv = tl.where(first, tl.load(H0 + bh, mask=m2, other=0.0),
                           tl.load(HSEQ + tp * B * H + bh, mask=m2, other=0.0))  # fmt: skip
            if HAS_CM:
                tl.store(DCM + t * B * H + bh, dcn * i * g, mask=m2)
            if HAS_ZH:
                tl.store(DZH + t * B * H + bh, d * (hpv - o * tc), mask=m2)
            if HAS_ZC:
                tl.store(DZC + t * B * H + bh, dc * (cp - ctv), mask=m2)
        dg = DG + t * B * GH + ba
        tl.store(dg, gi, mask=m2)
        tl.store(dg + H, gf, mask=m2)
        tl.store(dg + 2 * H, gg, mask=m2)
        tl.store(dg + 3 * H, go, mask=m2)
        dc_prev = dcn * f
        if HAS_ZC:
            dc_prev = dc_prev + dc * zc
        dc = dc_prev
        r0 = tl.dot(gi, tl.load(W + woff, mask=wmask, other=0.0), input_precision="ieee")
        r1 = tl.dot(gf, tl.load(W + HH + woff, mask=wmask, other=0.0), input_precision="ieee")
        r2 = tl.dot(gg, tl.load(W + 2 * HH + woff, mask=wmask, other=0.0),
                    input_precision="ieee")  # fmt: skip
        r3 = tl.dot(go, tl.load(W + 3 * HH + woff, mask=wmask, other=0.0),
                    input_precision="ieee")  # fmt: skip
        if HAS_RM:
            rmo = RM + t * rm_t + rb[:, None] * rm_b + rn[None, :] * rm_h
            if GR > 1:
                if MG:
                    drm = DRM + t * 4 * B * H + bh
                    tl.store(drm, r0 * hpv, mask=m2)
                    tl.store(drm + B * H, r1 * hpv, mask=m2)
                    tl.store(drm + 2 * B * H, r2 * hpv, mask=m2)
                    tl.store(drm + 3 * B * H, r3 * hpv, mask=m2)
                dhr = (r0 * tl.load(rmo, mask=m2, other=0.0)
                       + r1 * tl.load(rmo + rm_g, mask=m2, other=0.0)
                       + r2 * tl.load(rmo + 2 * rm_g, mask=m2, other=0.0)
                       + r3 * tl.load(rmo + 3 * rm_g, mask=m2, other=0.0))  # fmt: skip
            else:
                if MG:
                    tl.store(DRM + t * B * H + bh, (r0 + r1 + r2 + r3) * hpv, mask=m2)
                dhr = (r0 + r1 + r2 + r3) * tl.load(rmo, mask=m2, other=0.0)
        else:
            dhr = r0 + r1 + r2 + r3
    tl.store(DH0 + bh, carry + dhr, mask=m2)
    tl.store(DC0 + bh, dc, mask=m2)


def gru_fwd(
    ACT, W, BHH, H0, RM, CM, ZH, HSEQ, HNSEQ, HMSEQ,
    T, B, H,
    rm_t, rm_g, rm_b, rm_h, cm_t, cm_b, cm_h, zh_t, zh_b, zh_h,
    HAS_BH: tl.constexpr, HAS_RM: tl.constexpr, GR: tl.constexpr, HAS_CM: tl.constexpr,
    HAS_ZH: tl.constexpr, REVERSE: tl.constexpr, BB: tl.constexpr, BH: tl.constexpr,
):  # fmt: skip
    """ACT (T, B, 3H) holds the input projection; overwritten with the activations r, z, n."""
    pid = tl.program_id(0)
    rb = pid * BB + tl.arange(0, BB)
    rn = tl.arange(0, BH)
    mb = rb < B
    mn = rn < H
    m2 = mb[:, None] & mn[None, :]
    bh = rb[:, None] * H + rn[None, :]
    GH = 3 * H
    ba = rb[:, None] * GH + rn[None, :]
    wmask = mn[:, None] & mn[None, :]
    woff = rn[None, :] * H + rn[:, None]
    HH = H * H
    TBH = T * B * H
    br = tl.full((BH,), 0.0, tl.float32)
    bz = tl.full((BH,), 0.0, tl.float32)
    bn = tl.full((BH,), 0.0, tl.float32)
    if HAS_BH:
        br = tl.load(BHH + rn, mask=mn, other=0.0)
        bz = tl.load(BHH + H + rn, mask=mn, other=0.0)
        bn = tl.load(BHH + 2 * H + rn, mask=mn, other=0.0)
    h = tl.load(H0 + bh, mask=m2, other=0.0)
    for s in range(T):
        t = T - 1 - s if REVERSE else s
        hm0 = h
        hm1 = h
        hm2 = h
        if HAS_RM:
            rmo = RM + t * rm_t + rb[:, None] * rm_b + rn[None, :] * rm_h
            hmo = HMSEQ + t * B * H + bh
            hm0 = h * tl.load(rmo, mask=m2, other=0.0)
            tl.store(hmo, hm0, mask=m2)
            if GR > 1:
                hm1 = h * tl.load(rmo + rm_g, mask=m2, other=0.0)
                hm2 = h * tl.load(rmo + 2 * rm_g, mask=m2, other=0.0)
                tl.store(hmo + TBH, hm1, mask=m2)
                tl.store(hmo + 2 * TBH, hm2, mask=m2)
            else:
                hm1 = hm0
                hm2 = hm0
        pr = tl.dot(hm0, tl.load(W + woff, mask=wmask, other=0.0), input_precision="ieee")
        pz = tl.dot(hm1, tl.load(W + HH + woff, mask=wmask, other=0.0), input_precision="ieee")
        pn = tl.dot(hm2, tl.load(W + 2 * HH + woff, mask=wmask, other=0.0),
                    input_precision="ieee")  # fmt: skip
        pr = pr + br[None, :]
        pz = pz + bz[None, :]
        pn = pn + bn[None, :]
        a = ACT + t * B * GH + ba
        r = 1.0 / (1.0 + tl.exp(-(tl.load(a, mask=m2, other=0.0) + pr)))
        z = 1.0 / (1.0 + tl.exp(-(tl.load(a + H, mask=m2, other=0.0) + pz)))
        xn = tl.load(a + 2 * H, mask=m2, other=0.0) + r * pn
        n = 2.0 / (1.0 + tl.exp(-2.0 * xn)) - 1.0  # tanh without libdevice
        tl.store(a, r, mask=m2)
        tl.store(a + H, z, mask=m2)
        tl.store(a + 2 * H, n, mask=m2)
        tl.store(HNSEQ + t * B * H + bh, pn, mask=m2)
        nm = n
        if HAS_CM:
            nm = n * tl.load(CM + t * cm_t + rb[:, None] * cm_b + rn[None, :] * cm_h,
                             mask=m2, other=0.0)  # fmt: skip
        hn = nm + z * (h - nm)
        if HAS_ZH:
            zh = tl.load(ZH + t * zh_t + rb[:, None] * zh_b + rn[None, :] * zh_h,
                         mask=m2, other=0.0)  # fmt: skip
            hn = hn + zh * (h - hn)
        tl.store(HSEQ + t * B * H + bh, hn, mask=m2)
        h = hn


def gru_bwd(
    ACT, W, H0, HSEQ, HNSEQ, RM, CM, ZH, DHSEQ, DGX, DGH, DH0, DRM, DCM, DZH,
    T, B, H,
    rm_t, rm_g, rm_b, rm_h, cm_t, cm_b, cm_h, zh_t, zh_b, zh_h,
    HAS_RM: tl.constexpr, GR: tl.constexpr, HAS_CM: tl.constexpr, HAS_ZH: tl.constexpr,
    HAS_DH: tl.constexpr, REVERSE: tl.constexpr, BB: tl.constexpr, BH: tl.constexpr,
    MG: tl.constexpr,
):  # fmt: skip
    """Backprop through time: DGX dL/d(xp), DGH dL/d(hp) (T, B, 3H); DH0 (B, H).

    With MG (concrete dropout) also DRM (T, GR, B, H) dL/d(recurrent mask) = dL/d(masked
    h_{t-1}) ⊙ h_{t-1}, DCM dL/d(candidate mask) = dL/dh̃ ⊙ (1 − z) ⊙ n and DZH dL/dz_h =
    dL/dh_t ⊙ (h_{t-1} − h̃_t), (T, B, H); each only where its mask is.
    """
    pid = tl.program_id(0)
    rb = pid * BB + tl.arange(0, BB)
    rn = tl.arange(0, BH)
    mb = rb < B
    mn = rn < H
    m2 = mb[:, None] & mn[None, :]
    bh = rb[:, None] * H + rn[None, :]
    GH = 3 * H
    ba = rb[:, None] * GH + rn[None, :]
    wmask = mn[:, None] & mn[None, :]
    woff = rn[:, None] * H + rn[None, :]
    HH = H * H
    h0 = tl.load(H0 + bh, mask=m2, other=0.0)
    dhr = tl.full((BB, BH), 0.0, tl.float32)
    carry = tl.full((BB, BH), 0.0, tl.float32)
    for s in range(T):
        if REVERSE:
            t = s
            first = t == T - 1
            tp = tl.minimum(t + 1, T - 1)
        else:
            t = T - 1 - s
            first = t == 0
            tp = tl.maximum(t - 1, 0)
        d = carry + dhr
        if HAS_DH:
            d = d + tl.load(DHSEQ + t * B * H + bh, mask=m2, other=0.0)
        hp = tl.where(first, h0, tl.load(HSEQ + tp * B * H + bh, mask=m2, other=0.0))
        a = ACT + t * B * GH + ba
        r = tl.load(a, mask=m2, other=0.0)
        z = tl.load(a + H, mask=m2, other=0.0)
        n = tl.load(a + 2 * H, mask=m2, other=0.0)
        hn = tl.load(HNSEQ + t * B * H + bh, mask=m2, other=0.0)
        dht = d
        if HAS_ZH:
            zh = tl.load(ZH + t * zh_t + rb[:, None] * zh_b + rn[None, :] * zh_h,
                         mask=m2, other=0.0)  # fmt: skip
            dht = d * (1.0 - zh)
        nm = n
        dn = dht * (1.0 - z)
        if HAS_CM:
            cm = tl.load(CM + t * cm_t + rb[:, None] * cm_b + rn[None, :] * cm_h,
                         mask=m2, other=0.0)  # fmt: skip
            nm = n * cm
            dn = dht * (1.0 - z) * cm
        gn = dn * (1.0 - n * n)
        gr = gn * hn * (r * (1.0 - r))
        gz = dht * (hp - nm) * (z * (1.0 - z))
        ghn = gn * r
        if MG:
            if HAS_CM:
                tl.store(DCM + t * B * H + bh, dht * (1.0 - z) * n, mask=m2)
            if HAS_ZH:
                tl.store(DZH + t * B * H + bh, d * (hp - (nm + z * (hp - nm))), mask=m2)
        dgx = DGX + t * B * GH + ba
        tl.store(dgx, gr, mask=m2)
        tl.store(dgx + H, gz, mask=m2)
        tl.store(dgx + 2 * H, gn, mask=m2)
        dgh = DGH + t * B * GH + ba
        tl.store(dgh, gr, mask=m2)
        tl.store(dgh + H, gz, mask=m2)
        tl.store(dgh + 2 * H, ghn, mask=m2)
        carry = dht * z
        if HAS_ZH:
            carry = carry + d * zh
        r0 = tl.dot(gr, tl.load(W + woff, mask=wmask, other=0.0), input_precision="ieee")
        r1 = tl.dot(gz, tl.load(W + HH + woff, mask=wmask, other=0.0), input_precision="ieee")
        r2 = tl.dot(ghn, tl.load(W + 2 * HH + woff, mask=wmask, other=0.0),
                    input_precision="ieee")  # fmt: skip
        if HAS_RM:
            rmo = RM + t * rm_t + rb[:, None] * rm_b + rn[None, :] * rm_h
            if GR > 1:
                if MG:
                    drm = DRM + t * 3 * B * H + bh
                    tl.store(drm, r0 * hp, mask=m2)
                    tl.store(drm + B * H, r1 * hp, mask=m2)
                    tl.store(drm + 2 * B * H, r2 * hp, mask=m2)
                dhr = (r0 * tl.load(rmo, mask=m2, other=0.0)
                       + r1 * tl.load(rmo + rm_g, mask=m2, other=0.0)
                       + r2 * tl.load(rmo + 2 * rm_g, mask=m2, other=0.0))  # fmt: skip
            else:
                if MG:
                    tl.store(DRM + t * B * H + bh, (r0 + r1 + r2) * hp, mask=m2)
                dhr = (r0 + r1 + r2) * tl.load(rmo, mask=m2, other=0.0)
        else:
            dhr = r0 + r1 + r2
    tl.store(DH0 + bh, carry + dhr, mask=m2)


# ---- the step path (hidden sizes beyond the one-launch kernel) ----------------------------
# The loop runs on the host: per step a cuBLAS GEMM adds the recurrent product, then one of
# these kernels does the step's pointwise math, exactly the cells' step_forward/step_backward
# (rnndrop/nn/cells). One program per BLOCK elements of the (B, H) state; element e is
# (b, n) = (e // H, e % H). A mask row (B, H) of step t comes with its strides (0: shared).
# Tensors may be float32, float16 or bfloat16 (autocast): every load is widened to float32,
# the math runs in float32, and each store rounds once to its tensor's dtype.


def lstm_step_fwd(
    A, HP, CP, CM, ZH, ZC, HOUT, COUT, CTOUT, HMN, RMN,
    N, H, cm_b, cm_h, zh_b, zh_h, zc_b, zc_h, hmn_g, rmn_g, rmn_b, rmn_h,
    HAS_CM: tl.constexpr, HAS_ZH: tl.constexpr, HAS_ZC: tl.constexpr, HAS_NEXT: tl.constexpr,
    GR: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """A (B, 4H) pre-activations -> i, f, g, o in place; HOUT, COUT (B, H) h_t, c_t; CTOUT
    c̃_t (with zoneout on c); with HAS_NEXT, HMN (GR, B, H) ← h_t ⊙ RMN, the next step's
    masked h (the loop's GEMM input), saving the loop a launch."""
    e = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = e < N
    b = e // H
    n = e % H
    a = A + b * 4 * H + n
    i = 1.0 / (1.0 + tl.exp(-tl.load(a, mask=m, other=0.0).to(tl.float32)))
    f = 1.0 / (1.0 + tl.exp(-tl.load(a + H, mask=m, other=0.0).to(tl.float32)))
    g = 2.0 / (1.0 + tl.exp(-2.0 * tl.load(a + 2 * H, mask=m, other=0.0).to(tl.float32))) - 1.0
    o = 1.0 / (1.0 + tl.exp(-tl.load(a + 3 * H, mask=m, other=0.0).to(tl.float32)))
    tl.store(a, i, mask=m)
    tl.store(a + H, f, mask=m)
    tl.store(a + 2 * H, g, mask=m)
    tl.store(a + 3 * H, o, mask=m)
    hp = tl.load(HP + e, mask=m, other=0.0).to(tl.float32)
    cp = tl.load(CP + e, mask=m, other=0.0).to(tl.float32)
    gm = g
    if HAS_CM:
        gm = g * tl.load(CM + b * cm_b + n * cm_h, mask=m, other=0.0).to(tl.float32)
    ct = f * cp + i * gm
    h = o * (2.0 / (1.0 + tl.exp(-2.0 * ct)) - 1.0)
    c = ct
    if HAS_ZC:
        c = ct + tl.load(ZC + b * zc_b + n * zc_h, mask=m, other=0.0).to(tl.float32) * (cp - ct)
        tl.store(CTOUT + e, ct, mask=m)
    if HAS_ZH:
        h = h + tl.load(ZH + b * zh_b + n * zh_h, mask=m, other=0.0).to(tl.float32) * (hp - h)
    tl.store(HOUT + e, h, mask=m)
    tl.store(COUT + e, c, mask=m)
    if HAS_NEXT:  # the next step's masked h_t: h_t as stored (rounded) ⊙ its mask, per group
        hs = h.to(HOUT.dtype.element_ty).to(tl.float32)
        ro = RMN + b * rmn_b + n * rmn_h
        tl.store(HMN + e, hs * tl.load(ro, mask=m, other=0.0).to(tl.float32), mask=m)
        if GR > 1:
            tl.store(HMN + hmn_g + e, hs * tl.load(ro + rmn_g, mask=m, other=0.0).to(tl.float32),
                     mask=m)  # fmt: skip
            tl.store(HMN + 2 * hmn_g + e,
                     hs * tl.load(ro + 2 * rmn_g, mask=m, other=0.0).to(tl.float32),
                     mask=m)  # fmt: skip
            if GR > 3:
                tl.store(HMN + 3 * hmn_g + e,
                         hs * tl.load(ro + 3 * rmn_g, mask=m, other=0.0).to(tl.float32),
                         mask=m)  # fmt: skip


def lstm_step_bwd(
    A, CT, CP, HP, CM, ZH, ZC, CIN, DH, DHREC, MN, DC, DG, CARRY, DCP, DCM, DZH, DZC,
    N, H, cm_b, cm_h, zh_b, zh_h, zc_b, zc_h, mn_g, mn_b, mn_h,
    HAS_CM: tl.constexpr, HAS_ZH: tl.constexpr, HAS_ZC: tl.constexpr,
    HAS_DH: tl.constexpr, HAS_REC: tl.constexpr, HAS_MN: tl.constexpr, GR: tl.constexpr,
    MG_CM: tl.constexpr, MG_ZH: tl.constexpr, MG_ZC: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Backward of lstm_step_fwd. dL/dh_t is gathered here from CIN (the direct gradient from
    step t+1), DH (the output's, HAS_DH) and DHREC (GR, B, H) dL/d(masked h_t) of step t+1
    (HAS_REC) times its recurrent mask MN (HAS_MN); DC dL/dc_t, CT c̃_t (c_t without zoneout on c),
    A the activations; writes DG (B, 4H) dL/d(pre-activations), CARRY zoneout's direct
    gradient into h_{t-1} (0 without it), DCP dL/dc_{t-1}, and under MG_* the gradients of
    this step's masks: DCM dL/dc̃ ⊙ i ⊙ g, DZH dL/dh_t ⊙ (h_{t-1} − h̃_t), DZC dL/dc_t ⊙
    (c_{t-1} − c̃_t)."""
    e = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = e < N
    b = e // H
    n = e % H
    a = A + b * 4 * H + n
    i = tl.load(a, mask=m, other=0.0).to(tl.float32)
    f = tl.load(a + H, mask=m, other=0.0).to(tl.float32)
    g = tl.load(a + 2 * H, mask=m, other=0.0).to(tl.float32)
    o = tl.load(a + 3 * H, mask=m, other=0.0).to(tl.float32)
    # dL/dh_t = carry + dh_t + Σ_k dL/d(masked h_t)_k ⊙ m_k (step t+1's GEMM and mask)
    d = tl.load(CIN + e, mask=m, other=0.0).to(tl.float32)
    if HAS_DH:
        d = d + tl.load(DH + e, mask=m, other=0.0).to(tl.float32)
    if HAS_REC:
        mo = MN + b * mn_b + n * mn_h
        q = tl.load(DHREC + e, mask=m, other=0.0).to(tl.float32)
        if HAS_MN:
            q = q * tl.load(mo, mask=m, other=0.0).to(tl.float32)
        if GR > 1:
            q1 = tl.load(DHREC + N + e, mask=m, other=0.0).to(tl.float32)
            q2 = tl.load(DHREC + 2 * N + e, mask=m, other=0.0).to(tl.float32)
            if HAS_MN:
                q1 = q1 * tl.load(mo + mn_g, mask=m, other=0.0).to(tl.float32)
                q2 = q2 * tl.load(mo + 2 * mn_g, mask=m, other=0.0).to(tl.float32)
            q = q + q1 + q2
            if GR > 3:
                q3 = tl.load(DHREC + 3 * N + e, mask=m, other=0.0).to(tl.float32)
                if HAS_MN:
                    q3 = q3 * tl.load(mo + 3 * mn_g, mask=m, other=0.0).to(tl.float32)
                q = q + q3
        d = d + q
    dc = tl.load(DC + e, mask=m, other=0.0).to(tl.float32)
    ct = tl.load(CT + e, mask=m, other=0.0).to(tl.float32)
    cp = tl.load(CP + e, mask=m, other=0.0).to(tl.float32)
    dht = d
    carry = tl.full((BLOCK,), 0.0, tl.float32)
    if HAS_ZH:
        zh = tl.load(ZH + b * zh_b + n * zh_h, mask=m, other=0.0).to(tl.float32)
        dht = d * (1.0 - zh)
        carry = d * zh
    dcn = dc
    if HAS_ZC:
        zc = tl.load(ZC + b * zc_b + n * zc_h, mask=m, other=0.0).to(tl.float32)
        dcn = dc * (1.0 - zc)
    tc = 2.0 / (1.0 + tl.exp(-2.0 * ct)) - 1.0
    dcn = dcn + dht * o * (1.0 - tc * tc)
    gm = g
    dgg = dcn * i
    if HAS_CM:
        cm = tl.load(CM + b * cm_b + n * cm_h, mask=m, other=0.0).to(tl.float32)
        gm = g * cm
        dgg = dcn * i * cm
    dg = DG + b * 4 * H + n
    tl.store(dg, dcn * gm * (i * (1.0 - i)), mask=m)
    tl.store(dg + H, dcn * cp * (f * (1.0 - f)), mask=m)
    tl.store(dg + 2 * H, dgg * (1.0 - g * g), mask=m)
    tl.store(dg + 3 * H, dht * tc * (o * (1.0 - o)), mask=m)
    if MG_CM:
        tl.store(DCM + e, dcn * i * g, mask=m)
    if MG_ZH:
        tl.store(DZH + e, d * (tl.load(HP + e, mask=m, other=0.0).to(tl.float32) - o * tc), mask=m)
    if MG_ZC:
        tl.store(DZC + e, dc * (cp - ct), mask=m)
    dcp = dcn * f
    if HAS_ZC:
        dcp = dcp + dc * zc
    tl.store(DCP + e, dcp, mask=m)
    tl.store(CARRY + e, carry, mask=m)


def gru_step_fwd(
    A, REC, HP, CM, ZH, HOUT, EXTRA, HMN, RMN,
    N, H, cm_b, cm_h, zh_b, zh_h, hmn_g, rmn_g, rmn_b, rmn_h,
    HAS_CM: tl.constexpr, HAS_ZH: tl.constexpr, HAS_NEXT: tl.constexpr, GR: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    """A (B, 3H) input projections -> r, z, n in place, with REC (B, 3H) the recurrent
    product (b_hh included); EXTRA (B, H) ← its n block (saved for backward); HOUT h_t;
    HMN as in lstm_step_fwd."""
    e = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = e < N
    b = e // H
    n = e % H
    a = A + b * 3 * H + n
    rec = REC + b * 3 * H + n
    r = 1.0 / (1.0 + tl.exp(-(tl.load(a, mask=m, other=0.0).to(tl.float32)
                              + tl.load(rec, mask=m, other=0.0).to(tl.float32))))  # fmt: skip
    z = 1.0 / (1.0 + tl.exp(-(tl.load(a + H, mask=m, other=0.0).to(tl.float32)
                              + tl.load(rec + H, mask=m, other=0.0).to(tl.float32))))  # fmt: skip
    pn = tl.load(rec + 2 * H, mask=m, other=0.0).to(tl.float32)
    xn = tl.load(a + 2 * H, mask=m, other=0.0).to(tl.float32) + r * pn
    nn = 2.0 / (1.0 + tl.exp(-2.0 * xn)) - 1.0
    tl.store(a, r, mask=m)
    tl.store(a + H, z, mask=m)
    tl.store(a + 2 * H, nn, mask=m)
    tl.store(EXTRA + e, pn, mask=m)
    hp = tl.load(HP + e, mask=m, other=0.0).to(tl.float32)
    nm = nn
    if HAS_CM:
        nm = nn * tl.load(CM + b * cm_b + n * cm_h, mask=m, other=0.0).to(tl.float32)
    h = nm + z * (hp - nm)
    if HAS_ZH:
        h = h + tl.load(ZH + b * zh_b + n * zh_h, mask=m, other=0.0).to(tl.float32) * (hp - h)
    tl.store(HOUT + e, h, mask=m)
    if HAS_NEXT:  # the next step's masked h_t: h_t as stored (rounded) ⊙ its mask, per group
        hs = h.to(HOUT.dtype.element_ty).to(tl.float32)
        ro = RMN + b * rmn_b + n * rmn_h
        tl.store(HMN + e, hs * tl.load(ro, mask=m, other=0.0).to(tl.float32), mask=m)
        if GR > 1:
            tl.store(HMN + hmn_g + e, hs * tl.load(ro + rmn_g, mask=m, other=0.0).to(tl.float32),
                     mask=m)  # fmt: skip
            tl.store(HMN + 2 * hmn_g + e,
                     hs * tl.load(ro + 2 * rmn_g, mask=m, other=0.0).to(tl.float32),
                     mask=m)  # fmt: skip
            if GR > 3:
                tl.store(HMN + 3 * hmn_g + e,
                         hs * tl.load(ro + 3 * rmn_g, mask=m, other=0.0).to(tl.float32),
                         mask=m)  # fmt: skip


def gru_step_bwd(
    A, EXTRA, HP, CM, ZH, CIN, DH, DHREC, MN, DGX, DGH, CARRY, DCM, DZH,
    N, H, cm_b, cm_h, zh_b, zh_h, mn_g, mn_b, mn_h,
    HAS_CM: tl.constexpr, HAS_ZH: tl.constexpr,
    HAS_DH: tl.constexpr, HAS_REC: tl.constexpr, HAS_MN: tl.constexpr, GR: tl.constexpr,
    MG_CM: tl.constexpr, MG_ZH: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Backward of gru_step_fwd, dL/dh_t gathered as in lstm_step_bwd: DGX dL/d(xp_t), DGH
    dL/d(hp_t) (B, 3H), CARRY the direct gradient into h_{t-1}; under MG_*: DCM dL/dh̃ ⊙
    (1 − z) ⊙ n, DZH dL/dh_t ⊙ (h_{t-1} − h̃_t)."""
    e = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = e < N
    b = e // H
    n = e % H
    a = A + b * 3 * H + n
    r = tl.load(a, mask=m, other=0.0).to(tl.float32)
    z = tl.load(a + H, mask=m, other=0.0).to(tl.float32)
    nn = tl.load(a + 2 * H, mask=m, other=0.0).to(tl.float32)
    pn = tl.load(EXTRA + e, mask=m, other=0.0).to(tl.float32)
    hp = tl.load(HP + e, mask=m, other=0.0).to(tl.float32)
    # dL/dh_t = carry + dh_t + Σ_k dL/d(masked h_t)_k ⊙ m_k (step t+1's GEMM and mask)
    d = tl.load(CIN + e, mask=m, other=0.0).to(tl.float32)
    if HAS_DH:
        d = d + tl.load(DH + e, mask=m, other=0.0).to(tl.float32)
    if HAS_REC:
        mo = MN + b * mn_b + n * mn_h
        q = tl.load(DHREC + e, mask=m, other=0.0).to(tl.float32)
        if HAS_MN:
            q = q * tl.load(mo, mask=m, other=0.0).to(tl.float32)
        if GR > 1:
            q1 = tl.load(DHREC + N + e, mask=m, other=0.0).to(tl.float32)
            q2 = tl.load(DHREC + 2 * N + e, mask=m, other=0.0).to(tl.float32)
            if HAS_MN:
                q1 = q1 * tl.load(mo + mn_g, mask=m, other=0.0).to(tl.float32)
                q2 = q2 * tl.load(mo + 2 * mn_g, mask=m, other=0.0).to(tl.float32)
            q = q + q1 + q2
            if GR > 3:
                q3 = tl.load(DHREC + 3 * N + e, mask=m, other=0.0).to(tl.float32)
                if HAS_MN:
                    q3 = q3 * tl.load(mo + 3 * mn_g, mask=m, other=0.0).to(tl.float32)
                q = q + q3
        d = d + q
    dht = d
    if HAS_ZH:
        zh = tl.load(ZH + b * zh_b + n * zh_h, mask=m, other=0.0).to(tl.float32)
        dht = d * (1.0 - zh)
    nm = nn
    dn = dht * (1.0 - z)
    if HAS_CM:
        cm = tl.load(CM + b * cm_b + n * cm_h, mask=m, other=0.0).to(tl.float32)
        nm = nn * cm
        dn = dht * (1.0 - z) * cm
    gn = dn * (1.0 - nn * nn)
    gr = gn * pn * (r * (1.0 - r))
    gz = dht * (hp - nm) * (z * (1.0 - z))
    dgx = DGX + b * 3 * H + n
    tl.store(dgx, gr, mask=m)
    tl.store(dgx + H, gz, mask=m)
    tl.store(dgx + 2 * H, gn, mask=m)
    dgh = DGH + b * 3 * H + n
    tl.store(dgh, gr, mask=m)
    tl.store(dgh + H, gz, mask=m)
    tl.store(dgh + 2 * H, gn * r, mask=m)
    if MG_CM:
        tl.store(DCM + e, dht * (1.0 - z) * nn, mask=m)
    if MG_ZH:
        tl.store(DZH + e, d * (hp - (nm + z * (hp - nm))), mask=m)
    carry = dht * z
    if HAS_ZH:
        carry = carry + d * zh
    tl.store(CARRY + e, carry, mask=m)
