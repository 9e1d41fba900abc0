"""Triton kernels of the ``triton`` loop backend: each loop written once, for every cell.

FlashRNN's layout: the loops here know the gate count, the state and the masks; a cell is
its pointwise math, two functions in its own file (``cell_lstm.py``, ``cell_gru.py``,
``cell_rnn.py``) that every kernel calls as ``cell_forward`` and ``cell_backward``. The
adapter (:func:`rnndrop.kernels.triton._kernel`) binds those two names per cell when it
instantiates a kernel, so each cell gets its own compiled kernels.

- ``loop_fwd`` / ``loop_bwd``: the whole time loop of one layer in one launch (issue 11,
  hidden sizes up to ``MAX_H``). Each program owns ``BB`` rows of the batch and runs every
  step; ``h`` (and ``c``) stay in registers between steps, and each step re-reads the
  ``W_hh`` gate tiles (from L2 on a GPU) for one ``tl.dot`` per gate. Backward is the same
  loop in reverse: it writes the gradients of the gate pre-activations and ``dh0`` /
  ``dc0``; the weight and input gradients are GEMMs over all ``T·B`` rows done by the
  adapter outside the kernel.
- ``step_fwd`` / ``step_bwd``: one step's pointwise math for the step path (any hidden size,
  float32/float16/bfloat16): the host runs the loop and a cuBLAS GEMM per step adds the
  recurrent product. One program per ``BLOCK`` elements of the ``(B, H)`` state; element
  ``e`` is ``(b, n) = (e // H, e % H)``. A cell that reduces over a batch row (the LayerNorm
  LSTM, ``ROWS``) gets one program per row instead (``BLOCK`` ≥ H, ``n`` its lanes). Every
  load is widened to float32, the math runs in float32, and each store rounds once to its
  tensor's dtype.

The masks come in as tensors (the engine draws and records them); a stride of 0 broadcasts
a mask that is shared over time, gates or batch. Padded rows (``b ≥ B``) and columns
(``n ≥ H``) load as 0 and stay 0 through every step.

A cell's pointwise math, on tiles of any shape (``(BB, BH)`` in the loop kernels,
``(BLOCK,)`` in the step kernels), float32::

    cell_forward(xs, ps, h, c, ms, SM) -> (acts, h̃, c̃, aux)
    cell_backward(acts, aux, hp, cp, ct, dh, dc, ms, SM) -> (dgx, dgh, dhp, dcp, h̃, dms)

Forward: ``xs`` the ``G`` pre-activation blocks (``x W_ihᵀ + b_x``, plus the recurrent
product ``h W_hh,kᵀ`` unless the cell is ``SPLIT``; then ``ps`` holds the products, ``b_h``
included, and is empty otherwise); ``h``, ``c`` the state before the step (``c`` a
placeholder for a cell without one); ``ms`` the step masks: this step's tile of each
``"step"`` field of :class:`~rnndrop.kernels.contract.LayerMasks`, in
``LayerMasks.step_names()`` order (a placeholder where absent); ``SM`` their pointers,
None where absent, so ``SM[k] is not None`` is a constexpr (a bool kept in a tuple of its
own would not be: Triton turns it into a tensor). A cell reads the masks its file names in
``STEP_MASKS``, at their positions, which are the fields' names in capitals (imported from
here): ``ms[CANDIDATE]`` under ``if SM[CANDIDATE] is not None``. The adapter hands it no
other (the loops' own, zoneout, aside). It returns the ``G`` activations saved for
backward (``Saved.acts``), the new state before zoneout, and ``aux``, the tile a ``SPLIT``
cell saves per step (``Saved.hn_seq``). Backward: ``acts``, ``aux`` as saved; ``hp``,
``cp`` the state before the step, ``ct`` the cell state ``c̃`` before zoneout; ``dh``
dL/dh̃, ``dc`` dL/dc̃ (zoneout's shares already taken off). It returns dL/d(input
pre-activations) and dL/d(recurrent product) per gate (the same tuple unless ``SPLIT``),
the gradients into ``h_{t-1}`` and ``c_{t-1}`` through the cell itself (not through
``W_hh``), ``h̃`` (for zoneout's mask gradient), and ``dms``: ``ms`` with dL/d(mask) put
at the position of each mask the cell reads (:func:`put`; stored only where the mask's
gradient is asked for).
The loops apply zoneout (``ZONEOUT_H``, ``ZONEOUT_C``), the recurrent masks, and every load
and store, the mask gradients included.

The step masks travel as one group, as in the compiled CPU loop: ``SM`` a tuple of pointers
in ``step_names()`` order, None where a mask is absent (or the cell does not read it), with
their strides ``sm_t`` / ``sm_b`` / ``sm_h`` as tuples of the same length, and in backward
``DSM`` the pointers of their per-step gradients (None where not asked for). Triton
specialises each None to a constexpr, so an absent mask costs neither a parameter nor a
branch, and a new step field of ``LayerMasks`` changes no kernel here.

A ``ROWS`` cell (step kernels only) takes five more arguments in forward, ``EX, SV, n, m,
H``, and six in backward, ``EX, SV, DEX, n, m, H``: its packed parameters
(``LayerInputs.extra`` concatenated), its row of ``Saved.extra`` for this step, its row of
the ``(B, Σ numel)`` gradient accumulator, which it loads, adds to and stores itself (no
other program owns the row), and the lanes' columns, mask and ``H``. It writes no ``aux``
(it saves its own row instead; ``Saved.hn_seq`` is None).

The functions here carry no ``@triton.jit``: Triton picks compiler or interpreter when its
decorator runs, reading ``TRITON_INTERPRET`` at that moment, and a function must be jitted
in the same mode as the kernel that calls it. The adapter copies the functions of this file
and of the cell's into one namespace per cell and mode and wraps each as a ``JITFunction``
(CUDA) or an ``InterpretedFunction`` (``TRITON_INTERPRET=1``, CPU), so helpers are plain
function calls here (inlined by the compiler).

Designed around the interpreter's limits:
- no ``libdevice``: ``tanh(x)`` is written ``2σ(2x) − 1`` and ``σ(x)`` as ``1 / (1 + exp(−x))``;
- no bf16 ``tl.dot``: the loop kernels run float32 only (the adapter refuses other dtypes);
- no grid-wide barrier (programs run one after another, a barrier would deadlock): no
  program ever reads what another writes; each owns its batch rows for the whole sequence;
- ``tl.dot`` on fp32 defaults to TF32 on a GPU: every dot passes ``input_precision="ieee"``;
- no function of Triton's standard library that is itself ``@jit`` (``tl.zeros``,
  ``tl.sigmoid``, ...): those were decorated at ``import triton`` - which torch's dynamo does
  early, before a test can set ``TRITON_INTERPRET`` - and a compiled-mode one raises "Cannot
  call @triton.jit'd outside of the scope of a kernel" in the interpreter. Only builtins
  (``tl.full``, ``tl.exp``, ``tl.dot``, ``tl.where``, ...) and the helpers below appear.
"""

# Triton's front end has no starred expressions: tuples of gate blocks grow by `+`
# ruff: noqa: RUF005

import triton.language as tl

from ..contract import LayerMasks

# ---- the step masks: LayerMasks' "step" fields, one group in step_names() order ----------

# Each field's position is a constexpr named after it (CANDIDATE, CELL, ZONEOUT_H, ...),
# generated, so that a new step field adds none here; the cells import those they read.
_POSITIONS = {name.upper(): tl.constexpr(k) for k, name in enumerate(LayerMasks.step_names())}
globals().update(_POSITIONS)
ZONEOUT_H, ZONEOUT_C = _POSITIONS["ZONEOUT_H"], _POSITIONS["ZONEOUT_C"]  # the loops' own, named
LOOP_MASKS = ("zoneout_h", "zoneout_c")  # the step masks the loops read (a cell: STEP_MASKS)

# ---- helpers shared by the kernels and the cells -------------------------------------------


def sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


def tanh(x):
    return 2.0 / (1.0 + tl.exp(-2.0 * x)) - 1.0  # without libdevice


def zeros_like(x):
    return tl.full(x.shape, 0.0, tl.float32)


def rows(B, H, BB: tl.constexpr, BH: tl.constexpr):
    """This program's batch rows ``rb``, the feature columns ``rn``, their (BB, BH) mask and
    the offsets of a (B, H) tile."""
    rb = tl.program_id(0) * BB + tl.arange(0, BB)
    rn = tl.arange(0, BH)
    m2 = (rb < B)[:, None] & (rn < H)[None, :]
    return rb, rn, m2, rb[:, None] * H + rn[None, :]


def mask_tile(M, t, m_t, m_b, m_h, rb, rn, m2):
    """Step ``t``'s (BB, BH) tile of a mask with strides (time, batch, feature)."""
    return tl.load(M + t * m_t + rb[:, None] * m_b + rn[None, :] * m_h, mask=m2, other=0.0)


def step_tiles(SM, t, sm_t, sm_b, sm_h, rb, rn, m2, fill):
    """Step ``t``'s (BB, BH) tile of each step mask (``fill`` where absent)."""
    ms = ()
    for k in tl.static_range(len(SM)):
        if SM[k] is not None:
            ms = ms + (mask_tile(SM[k], t, sm_t[k], sm_b[k], sm_h[k], rb, rn, m2),)
        else:
            ms = ms + (fill,)
    return ms


def step_rows(SM, b, n, sm_b, sm_h, m, fill):
    """This step's elements of each step mask, widened to float32 (``fill`` where absent)."""
    ms = ()
    for k in tl.static_range(len(SM)):
        if SM[k] is not None:
            ms = ms + (load32(SM[k] + b * sm_b[k] + n * sm_h[k], m),)
        else:
            ms = ms + (fill,)
    return ms


def put(t, k: tl.constexpr, v):
    """The tuple ``t`` with entry ``k`` replaced by ``v`` (a cell's mask gradients, ``dms``)."""
    out = ()
    for j in tl.static_range(len(t)):
        if j == k:  # noqa: SIM108 (a statement: the front end resolves it at compile time)
            out = out + (v,)
        else:
            out = out + (t[j],)
    return out


def mask_grad(k: tl.constexpr, dms, d, hp, hn, dc, cp, ct):
    """dL/d(step mask ``k``): zoneout's are the loops' (dL/dh_t ⊙ (h_{t-1} − h̃_t),
    dL/dc_t ⊙ (c_{t-1} − c̃_t)), every other the cell's (``dms[k]``)."""
    g = dms[k]
    if k == ZONEOUT_H:
        g = d * (hp - hn)
    if k == ZONEOUT_C:
        g = dc * (cp - ct)
    return g


def elements(N, H, BLOCK: tl.constexpr):
    """This program's elements ``e`` of a (B, H) state, their mask, row and column."""
    e = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    return e, e < N, e // H, e % H


def row(H, BLOCK: tl.constexpr):
    """The row layout (``ROWS``): this program's batch row ``b`` of a (B, H) state, its
    elements ``e``, their mask and column (``BLOCK`` ≥ H)."""
    b = tl.program_id(0)
    n = tl.arange(0, BLOCK)
    return b * H + n, n < H, b, n


def load32(P, m):
    return tl.load(P, mask=m, other=0.0).to(tl.float32)


def add(a, b):
    return a + b


def row_sum(x):
    """The sum of a (BLOCK,) tile: ``tl.reduce`` with :func:`add`, which is wrapped in the
    kernel's mode (``tl.sum`` is jitted at import, in compiled mode only)."""
    return tl.reduce(x, 0, add)


# ---- the whole loop in one launch -----------------------------------------------------------


def loop_fwd(
    ACT, W, BHH, H0, C0, RM, SM, HSEQ, CSEQ, CTSEQ, HMSEQ, AUXSEQ,
    T, B, H,
    rm_t, rm_g, rm_b, rm_h, sm_t, sm_b, sm_h,
    G: tl.constexpr, HAS_C: tl.constexpr, SPLIT: tl.constexpr, HAS_BH: tl.constexpr,
    HAS_RM: tl.constexpr, GR: tl.constexpr, REVERSE: tl.constexpr, BB: tl.constexpr,
    BH: tl.constexpr,
):  # fmt: skip
    """ACT (T, B, G·H) holds the input projection; overwritten with the activations.

    Writes HSEQ (and CSEQ) (T, B, H) the states, CTSEQ c̃ (with zoneout on c), HMSEQ
    (GR, T, B, H) the masked h_{t-1} per gate group (with a recurrent mask), AUXSEQ the
    cell's aux tile (SPLIT). BHH: b_h (HAS_BH), added to the recurrent products. SM: the
    step masks (T, B, H) with strides (sm_t, sm_b, sm_h), one per LayerMasks step field.
    """
    rb, rn, m2, bh = rows(B, H, BB, BH)
    mn = rn < H
    ba = rb[:, None] * (G * H) + rn[None, :]
    # gate tile k, transposed: Wt_k[j, n] = W[k·H + n, j] (rows: h's features, the dot's K)
    wmask = mn[:, None] & mn[None, :]
    woff = rn[None, :] * H + rn[:, None]
    TBH = T * B * H
    bs = ()  # b_h per gate block
    for k in tl.static_range(G):
        bk = tl.full((BH,), 0.0, tl.float32)
        if HAS_BH:
            bk = tl.load(BHH + k * H + rn, mask=mn, other=0.0)
        bs = bs + (bk,)
    h = tl.load(H0 + bh, mask=m2, other=0.0)
    c = h  # read only by cells with a cell state
    if HAS_C:
        c = tl.load(C0 + bh, mask=m2, other=0.0)
    for s in range(T):
        t = T - 1 - s if REVERSE else s
        hm = h
        if HAS_RM:  # the masked h_{t-1} (of gate group 0), kept for dL/dW_hh
            hm = h * mask_tile(RM, t, rm_t, rm_b, rm_h, rb, rn, m2)
            tl.store(HMSEQ + t * B * H + bh, hm, mask=m2)
        a = ACT + t * B * (G * H) + ba
        xs = ()
        ps = ()
        for k in tl.static_range(G):
            hk = hm
            if HAS_RM and GR > 1 and k > 0:  # untied: one mask per gate block
                hk = h * mask_tile(RM + k * rm_g, t, rm_t, rm_b, rm_h, rb, rn, m2)
                tl.store(HMSEQ + k * TBH + t * B * H + bh, hk, mask=m2)
            p = tl.dot(hk, tl.load(W + k * H * H + woff, mask=wmask, other=0.0),
                       input_precision="ieee")  # fmt: skip
            if HAS_BH:
                p = p + bs[k][None, :]
            x = tl.load(a + k * H, mask=m2, other=0.0)
            if SPLIT:
                xs = xs + (x,)
                ps = ps + (p,)
            else:
                xs = xs + (x + p,)
        ms = step_tiles(SM, t, sm_t, sm_b, sm_h, rb, rn, m2, h)
        acts, hn, cn, aux = cell_forward(xs, ps, h, c, ms, SM)  # noqa: F821 (bound per cell)
        for k in tl.static_range(G):
            tl.store(a + k * H, acts[k], mask=m2)
        if SPLIT:
            tl.store(AUXSEQ + t * B * H + bh, aux, mask=m2)
        if SM[ZONEOUT_C] is not None:
            tl.store(CTSEQ + t * B * H + bh, cn, mask=m2)
            cn = cn + ms[ZONEOUT_C] * (c - cn)
        if SM[ZONEOUT_H] is not None:
            hn = hn + ms[ZONEOUT_H] * (h - hn)
        tl.store(HSEQ + t * B * H + bh, hn, mask=m2)
        h = hn
        if HAS_C:
            tl.store(CSEQ + t * B * H + bh, cn, mask=m2)
            c = cn


def loop_bwd(
    ACT, W, H0, C0, HSEQ, CSEQ, CTSEQ, AUXSEQ, RM, SM, DHSEQ, DCLAST,
    DGX, DGH, DH0, DC0, DRM, DSM,
    T, B, H,
    rm_t, rm_g, rm_b, rm_h, sm_t, sm_b, sm_h,
    G: tl.constexpr, HAS_C: tl.constexpr, SPLIT: tl.constexpr,
    HAS_RM: tl.constexpr, GR: tl.constexpr, HAS_DH: tl.constexpr, REVERSE: tl.constexpr,
    BB: tl.constexpr, BH: tl.constexpr, MG: tl.constexpr,
):  # fmt: skip
    """Backprop through time: DGX dL/d(input projection), DGH dL/d(recurrent product)
    (T, B, G·H; written only when SPLIT, else DGX is both), DH0 (and DC0) (B, H).

    The per-step gradients of the masks applied in the loop (concrete dropout): with MG,
    DRM (T, GR, B, H) dL/d(recurrent mask) = dL/d(masked h_{t-1}) ⊙ h_{t-1}; and DSM, per
    step mask (T, B, H), None where its gradient is not asked for (:func:`mask_grad`).
    """
    rb, rn, m2, bh = rows(B, H, BB, BH)
    mn = rn < H
    ba = rb[:, None] * (G * H) + rn[None, :]
    # gate tile k: W_k[n, j] = W[k·H + n, j]; dL/d(masked h) = dg_k @ W_k
    wmask = mn[:, None] & mn[None, :]
    woff = rn[:, None] * H + rn[None, :]
    h0 = tl.load(H0 + bh, mask=m2, other=0.0)
    c0 = h0
    dc = h0  # dL/dc_t (cells with a cell state)
    if HAS_C:
        c0 = tl.load(C0 + bh, mask=m2, other=0.0)
        dc = tl.load(DCLAST + bh, mask=m2, other=0.0)
    dhr = tl.full((BB, BH), 0.0, tl.float32)  # into h_t through step t+1's recurrence
    carry = tl.full((BB, BH), 0.0, tl.float32)  # into h_t directly (zoneout, the cell)
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
        hp = tl.where(first, h0, tl.load(HSEQ + tp * B * H + bh, mask=m2, other=0.0))
        cp = hp
        ct = hp
        if HAS_C:
            cp = tl.where(first, c0, tl.load(CSEQ + tp * B * H + bh, mask=m2, other=0.0))
            if SM[ZONEOUT_C] is not None:
                ct = tl.load(CTSEQ + t * B * H + bh, mask=m2, other=0.0)
            else:
                ct = tl.load(CSEQ + t * B * H + bh, mask=m2, other=0.0)
        a = ACT + t * B * (G * H) + ba
        acts = ()
        for k in tl.static_range(G):
            acts = acts + (tl.load(a + k * H, mask=m2, other=0.0),)
        aux = hp
        if SPLIT:
            aux = tl.load(AUXSEQ + t * B * H + bh, mask=m2, other=0.0)
        ms = step_tiles(SM, t, sm_t, sm_b, sm_h, rb, rn, m2, hp)
        dht = d
        if SM[ZONEOUT_H] is not None:
            dht = d * (1.0 - ms[ZONEOUT_H])
        dcn = dc
        if SM[ZONEOUT_C] is not None:
            dcn = dc * (1.0 - ms[ZONEOUT_C])
        dgx, dgh, dhp, dcp, hn, dms = cell_backward(  # noqa: F821 (bound per cell)
            acts, aux, hp, cp, ct, dht, dcn, ms, SM
        )
        for k in tl.static_range(len(SM)):
            if DSM[k] is not None:
                tl.store(DSM[k] + t * B * H + bh, mask_grad(k, dms, d, hp, hn, dc, cp, ct),
                         mask=m2)  # fmt: skip
        g = DGX + t * B * (G * H) + ba
        for k in tl.static_range(G):
            tl.store(g + k * H, dgx[k], mask=m2)
        if SPLIT:
            g = DGH + t * B * (G * H) + ba
            for k in tl.static_range(G):
                tl.store(g + k * H, dgh[k], mask=m2)
        carry = dhp
        if SM[ZONEOUT_H] is not None:
            carry = carry + d * ms[ZONEOUT_H]
        if HAS_C:
            if SM[ZONEOUT_C] is not None:
                dcp = dcp + dc * ms[ZONEOUT_C]
            dc = dcp
        # dL/d(masked h_{t-1}) per gate block, then through the recurrent mask into h_{t-1}
        rs = ()
        for k in tl.static_range(G):
            rs = rs + (tl.dot(dgh[k], tl.load(W + k * H * H + woff, mask=wmask, other=0.0),
                              input_precision="ieee"),)  # fmt: skip
        if HAS_RM and GR > 1:
            rmo = RM + t * rm_t + rb[:, None] * rm_b + rn[None, :] * rm_h
            if MG:
                for k in tl.static_range(G):
                    tl.store(DRM + (t * G + k) * B * H + bh, rs[k] * hp, mask=m2)
            dhr = rs[0] * tl.load(rmo, mask=m2, other=0.0)
            for k in tl.static_range(1, G):
                dhr = dhr + rs[k] * tl.load(rmo + k * rm_g, mask=m2, other=0.0)
        else:
            dhr = rs[0]
            for k in tl.static_range(1, G):
                dhr = dhr + rs[k]
            if HAS_RM:
                if MG:
                    tl.store(DRM + t * B * H + bh, dhr * hp, mask=m2)
                dhr = dhr * mask_tile(RM, t, rm_t, rm_b, rm_h, rb, rn, m2)
    tl.store(DH0 + bh, carry + dhr, mask=m2)
    if HAS_C:
        tl.store(DC0 + bh, dc, mask=m2)


# ---- the step path (hidden sizes beyond the one-launch kernel) ----------------------------
# The loop runs on the host: per step a cuBLAS GEMM adds the recurrent product, then one of
# these kernels does the step's pointwise math, exactly the cells' step_forward/step_backward
# (rnndrop/nn/cells). A mask row (B, H) of step t comes with its strides (0: shared).


def step_fwd(
    A, REC, HP, CP, SM, HOUT, COUT, CTOUT, AUX, HMN, RMN, EX, SV,
    N, H, sm_b, sm_h, hmn_g, rmn_g, rmn_b, rmn_h, sv_b,
    G: tl.constexpr, HAS_C: tl.constexpr, SPLIT: tl.constexpr, HAS_NEXT: tl.constexpr,
    GR: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """A (B, G·H) pre-activations (the recurrent product added, unless SPLIT: then REC
    (B, G·H) holds it, b_h included) -> the activations in place; HOUT (and COUT) (B, H)
    h_t (c_t); CTOUT c̃_t (with zoneout on c); AUX the cell's aux tile (SPLIT); with
    HAS_NEXT, HMN (GR, B, H) ← h_t ⊙ RMN, the next step's masked h (the loop's GEMM input),
    saving the loop a launch. SM: the step masks (B, H) with strides (sm_b, sm_h). ROWS:
    one program per batch row; EX the cell's packed parameters, SV (B, W) its saved rows
    (row stride sv_b)."""
    if ROWS:
        e, m, b, n = row(H, BLOCK)
    else:
        e, m, b, n = elements(N, H, BLOCK)
    a = A + b * (G * H) + n
    rec = REC + b * (G * H) + n
    xs = ()
    ps = ()
    for k in tl.static_range(G):
        xs = xs + (load32(a + k * H, m),)
        if SPLIT:
            ps = ps + (load32(rec + k * H, m),)
    hp = load32(HP + e, m)
    cp = hp
    if HAS_C:
        cp = load32(CP + e, m)
    ms = step_rows(SM, b, n, sm_b, sm_h, m, hp)
    if ROWS:
        acts, h, c, aux = cell_forward(  # noqa: F821 (bound per cell)
            xs, ps, hp, cp, ms, SM, EX, SV + b * sv_b, n, m, H
        )
    else:
        acts, h, c, aux = cell_forward(xs, ps, hp, cp, ms, SM)  # noqa: F821
    for k in tl.static_range(G):
        tl.store(a + k * H, acts[k], mask=m)
    if SPLIT and not ROWS:  # a ROWS cell saved its own row
        tl.store(AUX + e, aux, mask=m)
    if SM[ZONEOUT_C] is not None:
        tl.store(CTOUT + e, c, mask=m)
        c = c + ms[ZONEOUT_C] * (cp - c)
    if SM[ZONEOUT_H] is not None:
        h = h + ms[ZONEOUT_H] * (hp - h)
    tl.store(HOUT + e, h, mask=m)
    if HAS_C:
        tl.store(COUT + e, c, mask=m)
    if HAS_NEXT:  # the next step's masked h_t: h_t as stored (rounded) ⊙ its mask, per group
        hs = h.to(HOUT.dtype.element_ty).to(tl.float32)
        ro = RMN + b * rmn_b + n * rmn_h
        for k in tl.static_range(GR):
            tl.store(HMN + k * hmn_g + e, hs * load32(ro + k * rmn_g, m), mask=m)


def step_bwd(
    A, AUX, HP, CP, CT, SM, CIN, DH, DHREC, MN, DC, DGX, DGH, CARRY, DCP, DSM, EX, SV, DEX,
    N, H, sm_b, sm_h, mn_g, mn_b, mn_h, sv_b, dex_b,
    G: tl.constexpr, HAS_C: tl.constexpr, SPLIT: tl.constexpr,
    HAS_DH: tl.constexpr, HAS_REC: tl.constexpr, HAS_MN: tl.constexpr, GR: tl.constexpr,
    ROWS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Backward of step_fwd. dL/dh_t is gathered here from CIN (the direct gradient from
    step t+1), DH (the output's, HAS_DH) and DHREC (GR, B, H) dL/d(masked h_t) of step t+1
    (HAS_REC) times its recurrent mask MN (HAS_MN); DC dL/dc_t, CT c̃_t (c_t without zoneout
    on c), A the activations, AUX the cell's aux tile (SPLIT); writes DGX (B, G·H)
    dL/d(pre-activations) (DGH dL/d(recurrent product) when SPLIT), CARRY the direct
    gradient into h_{t-1}, DCP dL/dc_{t-1}, and DSM the gradients of this step's masks
    (None where not asked for; :func:`mask_grad`).
    ROWS: one program per batch row; EX, SV as in step_fwd, DEX (B, ·) the accumulator of
    the gradients of the cell's parameters (row stride dex_b)."""
    if ROWS:
        e, m, b, n = row(H, BLOCK)
    else:
        e, m, b, n = elements(N, H, BLOCK)
    a = A + b * (G * H) + n
    acts = ()
    for k in tl.static_range(G):
        acts = acts + (load32(a + k * H, m),)
    hp = load32(HP + e, m)
    aux = hp
    if SPLIT and not ROWS:
        aux = load32(AUX + e, m)
    # dL/dh_t = carry + dh_t + Σ_k dL/d(masked h_t)_k ⊙ m_k (step t+1's GEMM and mask)
    d = load32(CIN + e, m)
    if HAS_DH:
        d = d + load32(DH + e, m)
    if HAS_REC:
        mo = MN + b * mn_b + n * mn_h
        q = load32(DHREC + e, m)
        if HAS_MN:
            q = q * load32(mo, m)
        for k in tl.static_range(1, GR):
            qk = load32(DHREC + k * N + e, m)
            if HAS_MN:
                qk = qk * load32(mo + k * mn_g, m)
            q = q + qk
        d = d + q
    dc = hp
    ct = hp
    cp = hp
    if HAS_C:
        dc = load32(DC + e, m)
        ct = load32(CT + e, m)
        cp = load32(CP + e, m)
    ms = step_rows(SM, b, n, sm_b, sm_h, m, hp)
    dht = d
    if SM[ZONEOUT_H] is not None:
        dht = d * (1.0 - ms[ZONEOUT_H])
    dcn = dc
    if SM[ZONEOUT_C] is not None:
        dcn = dc * (1.0 - ms[ZONEOUT_C])
    if ROWS:
        dgx, dgh, dhp, dcp, hn, dms = cell_backward(  # noqa: F821 (bound per cell)
            acts, aux, hp, cp, ct, dht, dcn, ms, SM, EX, SV + b * sv_b, DEX + b * dex_b, n,
            m, H
        )  # fmt: skip
    else:
        dgx, dgh, dhp, dcp, hn, dms = cell_backward(  # noqa: F821
            acts, aux, hp, cp, ct, dht, dcn, ms, SM
        )
    g = DGX + b * (G * H) + n
    for k in tl.static_range(G):
        tl.store(g + k * H, dgx[k], mask=m)
    if SPLIT:
        g = DGH + b * (G * H) + n
        for k in tl.static_range(G):
            tl.store(g + k * H, dgh[k], mask=m)
    for k in tl.static_range(len(SM)):
        if DSM[k] is not None:
            tl.store(DSM[k] + e, mask_grad(k, dms, d, hp, hn, dc, cp, ct), mask=m)
    if HAS_C:
        if SM[ZONEOUT_C] is not None:
            dcp = dcp + dc * ms[ZONEOUT_C]
        tl.store(DCP + e, dcp, mask=m)
    carry = dhp
    if SM[ZONEOUT_H] is not None:
        carry = carry + d * ms[ZONEOUT_H]
    tl.store(CARRY + e, carry, mask=m)
