"""The parity harness: every loop backend x cell x dropout site against tests/reference.py.

Combinations come from the library's registries (tests/parity.py): ``CELLS`` (a cell is one
``CELL_CASES`` entry: its module and its independent reference), ``BACKENDS`` (a backend
runs at float64 on CPU unless ``BACKEND_CASES`` says otherwise; Triton in its interpreter,
``TRITON_INTERPRET=1``, on both of its paths) and ``SITES`` (each site alone under every
option that applies to it, and the schemes that combine them). A combination the library
refuses is skipped with the library's reason (a site the cell lacks, a backend without the
cell's kernel).

- Module level: rnndrop's layer records the masks it drew; the reference applies the same
  masks by the book (README.md, "The schemes"; each cell's step equations). Outputs, final
  states and every gradient agree, so each mask acts at its site with the documented
  equation and each backend's hand-written backward is right. A spy counts the backend's
  calls: it ran for exactly the layers that need the time loop.
- Drop-in: with no dropout the layer is torch's (bitwise on the fused op; to rounding on the
  loop path, every backend).
- Layer level (the kernel contract): each compiled backend against the ``python`` loop
  (itself held to the reference above) on masks in every layout the contract allows, with
  and without the input projection and biases, at edge shapes, with partial gradients.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from compare import assert_matches_reference
from parity import (
    BACKEND_CASES,
    CELL_CASES,
    F32,
    F64,
    LAYER_CASES,
    LAYER_SITES,
    MODEL_SITES,
    SCHEMES,
    assert_layer_agrees,
    backend_refusal,
    cell_refusal,
    eval_variants,
    every_site,
    expected_keys,
    field_layouts,
    layer_call,
    layer_case_refusal,
    layer_tol,
    make_leaves,
    make_masks,
    module_tol,
    scheme,
    site_variants,
)
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from rnndrop.config import SITES
from rnndrop.config import RecurrentDropout as RD
from rnndrop.functional import keep_probability
from rnndrop.kernels import BACKENDS, LayerInputs
from rnndrop.nn import mc_dropout
from rnndrop.nn.cells import CELLS
from rnndrop.nn.masks import needs_loop

VARIANTS = site_variants()
EVAL_VARIANTS = eval_variants()
CELL_IDS = list(CELL_CASES)
ALL = list(BACKEND_CASES)
CHEAP = [b for b, c in BACKEND_CASES.items() if c.cheap]
COMPILED = [b for b in ALL if BACKEND_CASES[b].backend != "python"]
L, I, H, T, B = 2, 8, 8, 4, 3  # the module-level layer: two layers, both directions
LT, LB, LI, LH = 3, 3, 3, 5  # the layer-level tests (H = 5: Triton's 16-tiles mostly padding)


def use_backend(name: str, cell: str, monkeypatch, dtype=None):
    """Run the test on backend case ``name`` (its environment and RNNDROP_LOOP); skip with
    the backend's own reason where it cannot run ``cell``."""
    case = BACKEND_CASES[name]
    for k, v in case.env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("RNNDROP_LOOP", case.backend)
    if case.backend == "cpp":
        from rnndrop.kernels.cpp import build

        if not build.disabled():
            assert build.load() is not None, "the C++ loop kernel failed to build"
    why = backend_refusal(case, cell, dtype)
    if why is not None:
        pytest.skip(why)
    return case


def make(cell: str, cfg, dtype=F64, layers=L, bidir=True, bias=True, batch_first=False):
    """rnndrop's ``cell`` layer with ``cfg``; a site the cell lacks skips with its reason."""
    why = cell_refusal(cell, cfg)
    if why is not None:
        pytest.skip(why)
    m = CELL_CASES[cell].module(I, H, layers, bias=bias, batch_first=batch_first, dropout=cfg,
                                bidirectional=bidir)  # fmt: skip
    assert m.cell is CELLS[cell]
    own = tuple(f"{name}_l" for name, _, _ in getattr(CELLS[cell], "extra_params", ()))
    with torch.no_grad():  # a cell's own parameters away from their init (1s, 0s): a swapped
        for name, p in m.named_parameters():  # or ignored one shows
            if own and name.startswith(own):
                p.add_(0.5 * torch.randn_like(p))
    return m.to(dtype)


def state0(cell: str, D: int, dtype, layers=L, batch=B):
    """A random initial state in the cell's layout: ``(h0, c0)`` or ``h0``."""
    h = [torch.randn(layers * D, batch, H, dtype=dtype, requires_grad=True)
         for _ in range(2 if CELLS[cell].has_cell else 1)]  # fmt: skip
    return tuple(h) if CELLS[cell].has_cell else h[0]


def spy(monkeypatch, case) -> list:
    """A list that grows by one per call of the case's backend."""
    backend, calls = BACKENDS[case.backend], []
    forward = backend.forward
    monkeypatch.setattr(backend, "forward", lambda inp: calls.append(1) or forward(inp))
    return calls


def check(module, x, hx, sample, case, monkeypatch, cell):
    """The module against its reference on the case's backend (float32 backends against a
    float64 reference), and the backend ran for exactly the layers that need the loop."""
    calls = spy(monkeypatch, case)
    cfg, D = module.dropout, module.num_directions
    masks = assert_matches_reference(module, CELL_CASES[cell].reference, x, hx, sample,
                                     module_tol(case, cell), ref_dtype=F64)  # fmt: skip
    loops = sum(not _fused(cell) or needs_loop(cfg, layer, sample, module.num_layers)
                for layer in range(module.num_layers))  # fmt: skip
    assert len(calls) == loops * D
    if sample:
        assert set(masks) == expected_keys(cfg, module.num_layers, module.bidirectional)
        if masks and not cfg.concrete:
            # not vacuous: something dropped, something kept (the smallest draw, one mask of
            # I = 8 entries at rate 0.5, is degenerate with probability 2^-7), and no mask of
            # 16 entries or more drops everything (probability below 2^-16)
            entries = torch.cat([m.flatten() for m in masks.values()])
            assert (entries == 0).any() and (entries != 0).any()
            assert all((m != 0).any() for m in masks.values() if m.numel() >= 16)
    else:
        assert masks == {}  # no mask is drawn in eval
    return masks


def _fused(cell: str) -> bool:
    """The cell has a fused op (the LayerNorm LSTM has none: every layer runs the loop)."""
    return getattr(CELLS[cell], "fused", None) is not None


def _loops(cfg: RD, sample: bool, cell: str = "lstm") -> bool:
    return not _fused(cell) or any(needs_loop(cfg, layer, sample, L) for layer in range(L))


def _params(configs: dict, sample=True, backends=ALL):
    """(backend, cell, name) for every cell. A config whose every layer runs the fused op
    reaches no loop backend, so only ``python`` runs it (the others would repeat it); a
    backend that is not cheap (Triton's interpreter) runs the ``everything`` scheme only."""
    return [pytest.param(b, c, n, id=f"{b}-{c}-{n}")
            for b, c, (n, cfg) in itertools.product(backends, CELL_IDS, configs.items())
            if (BACKEND_CASES[b].backend == "python" or _loops(_resolve(cfg, c), sample, c))
            and (BACKEND_CASES[b].cheap or n == "everything")]  # fmt: skip


def _resolve(cfg, cell):
    return cfg if isinstance(cfg, RD) else cfg(cell)


# ---- the registries ----------------------------------------------------------------------------


def test_every_cell_and_backend_of_the_library_is_in_the_harness():
    assert set(CELL_CASES) == set(CELLS), "add the cell to tests/parity.py CELL_CASES"
    assert {c.backend for c in BACKEND_CASES.values()} == set(BACKENDS)
    # not vacuous: every layer site has variants, the gated ones tied and untied
    for name in LAYER_SITES:
        assert name in VARIANTS or any(v.startswith(f"{name}-") for v in VARIANTS), name
    assert {"recurrent-untied-per_step-per_batch", "input-tied-per_sequence-per_sample",
            "zoneout_cell", "candidate-concrete"} <= set(VARIANTS)  # fmt: skip


@pytest.mark.parametrize("cell", CELL_IDS)
@pytest.mark.parametrize("site", [n for n in LAYER_SITES if SITES[n].cells is not None])
def test_a_site_a_cell_lacks_is_refused_and_only_then(cell, site):
    """What makes the harness skip a site: the layer refuses it, naming it, whichever way the
    config is given; a cell the site lists builds."""
    lacks = cell not in SITES[site].cells
    for cfg in (RD(**{site: 0.3}), {site: 0.3}):
        if lacks:
            with pytest.raises(ValueError, match=rf"{site}=0\.3 have no meaning for a "
                               rf"{cell.upper()} \(it has no "):  # fmt: skip
                CELL_CASES[cell].module(4, 6, dropout=cfg)
        else:
            assert getattr(CELL_CASES[cell].module(4, 6, dropout=cfg).dropout, site) == 0.3
    if site == "zoneout_cell":  # the preset reads as zoneout on h alone for a cell without c
        m = CELL_CASES[cell].module(4, 6, dropout="zoneout")
        assert (m.dropout.zoneout_cell > 0) == (not lacks) and m.dropout.zoneout_hidden > 0
        if lacks:
            with pytest.raises(ValueError, match="zoneout_cell"):
                CELL_CASES[cell].module(4, 6, dropout=RD.zoneout(0.1, 0.2))


@pytest.mark.parametrize("site", MODEL_SITES)
@pytest.mark.parametrize("cell", CELL_IDS)
def test_model_sites_do_nothing_in_the_layer(cell, site):
    """The embedding site acts in the model: a layer given it warns and drops nothing."""
    with pytest.warns(UserWarning, match=f"{site}=0.3 has no effect"):
        m = make(cell, RD(**{site: 0.3}), F64, bidir=False)
    x = torch.randn(T, B, I, dtype=F64, requires_grad=True)
    hx = state0(cell, 1, F64)
    assert_matches_reference(m, CELL_CASES[cell].reference, x, hx, sample=True)
    assert m.last_masks == {}


def test_paths_are_the_documented_ones():
    """Which configs run the time loop (fused: torch's op with masks beside it or folded
    into the weights)."""
    fused = {
        "naive": RD.naive(0.3),
        "awd": RD.awd(0.0, 0.3, 0.2, 0.25, 0.4),
        "weight_drop": RD.weight_drop(0.4),
        "variational_per_batch": RD.variational(0.3).replace(batch="per_batch"),
        "untied_per_batch": RD.variational(0.3, tied=False).replace(batch="per_batch"),
    }
    loop = {"naive_recurrent": RD.naive_recurrent(0.3), "variational": RD.variational(0.3),
            "variational_untied": RD.variational(0.3, tied=False),
            "recurrent_per_step_per_batch": RD(recurrent=0.3, time="per_step",
                                               batch="per_batch"),
            "zoneout": RD.zoneout(0.2, 0.4), "semeniuta": RD.semeniuta(0.3),
            "semeniuta_per_sequence": RD.semeniuta(0.3, time="per_sequence")}  # fmt: skip
    for name, cfg in fused.items():
        assert not _loops(cfg, True), name
    for name, cfg in loop.items():
        assert _loops(cfg, True), name
    mixed = RD(input=0.3, tied=False)  # untied per-sample input masks: layer 0 only
    assert needs_loop(mixed, 0, True) and not needs_loop(mixed, 1, True)
    # in eval only zoneout and classic candidate scaling need the loop
    for name, cfg in {**fused, **loop}.items():
        assert _loops(cfg, False) == (name == "zoneout"), name
    assert _loops(every_site("lstm"), False) and _loops(every_site("gru", scaling="classic"), False)
    assert not _loops(every_site("rnn_tanh", scaling="classic"), False)  # no candidate


# ---- module level: each site alone, the schemes, against the reference --------------------


@pytest.mark.parametrize("backend,cell,variant", _params(VARIANTS))
def test_site_matches_reference(backend, cell, variant, monkeypatch):
    """One site, under one set of options, in training: both directions, an initial state."""
    case = use_backend(backend, cell, monkeypatch)
    torch.manual_seed(1)
    m = make(cell, VARIANTS[variant], case.dtype)
    x = torch.randn(T, B, I, dtype=case.dtype, requires_grad=True)
    check(m, x, state0(cell, 2, case.dtype), True, case, monkeypatch, cell)


# one direction without an initial state, both directions with one (the sites alone: the
# latter). Triton's interpreter: its module level is the packed test (against the reference)
# and the backend-independence test (masks, outputs, every gradient against python's).
_SCHEME_PARAMS = [pytest.param(*p.values, bidir, bidir, id=f"{p.id}-{'bi-hx' if bidir else 'uni'}")
                  for p in _params(SCHEMES, backends=CHEAP) for bidir in (False, True)]  # fmt: skip


@pytest.mark.parametrize("backend,cell,name,bidir,with_hx", _SCHEME_PARAMS)
def test_scheme_matches_reference(backend, cell, name, bidir, with_hx, monkeypatch):
    case = use_backend(backend, cell, monkeypatch)
    torch.manual_seed(1)
    m = make(cell, scheme(name, cell), case.dtype, bidir=bidir)
    x = torch.randn(T, B, I, dtype=case.dtype, requires_grad=True)
    hx = state0(cell, 2 if bidir else 1, case.dtype) if with_hx else None
    check(m, x, hx, True, case, monkeypatch, cell)


@pytest.mark.parametrize("backend,cell,name", _params({**SCHEMES, **EVAL_VARIANTS}, False, CHEAP))
def test_eval_matches_reference_expectations(backend, cell, name, monkeypatch):
    """Deterministic eval: the expectation each site's scaling implies (zoneout's, classic
    scaling's), no mask drawn."""
    cfg = {**SCHEMES, **EVAL_VARIANTS}[name]
    case = use_backend(backend, cell, monkeypatch)
    m = make(cell, _resolve(cfg, cell), case.dtype).eval()
    x = torch.randn(T, B, I, dtype=case.dtype, requires_grad=True)
    check(m, x, state0(cell, 2, case.dtype), False, case, monkeypatch, cell)


MC = {n: SCHEMES[n] for n in ("variational", "zoneout", "awd", "everything")}


@pytest.mark.parametrize("backend,cell,name", _params(MC, backends=CHEAP))
def test_mc_mode_matches_reference_with_its_masks(backend, cell, name, monkeypatch):
    case = use_backend(backend, cell, monkeypatch)
    m = make(cell, scheme(name, cell), case.dtype, bias=name != "everything").eval()
    x = torch.randn(T, B, I, dtype=case.dtype, requires_grad=True)
    with mc_dropout(m):
        check(m, x, None, True, case, monkeypatch, cell)
    assert m.mc is False and not m.training


@pytest.mark.parametrize("backend", CHEAP)
@pytest.mark.parametrize("cell", CELL_IDS)
def test_without_bias_matches_reference(backend, cell, monkeypatch):
    case = use_backend(backend, cell, monkeypatch)
    m = make(cell, every_site(cell, tied=False), case.dtype, bias=False)
    x = torch.randn(T, B, I, dtype=case.dtype, requires_grad=True)
    check(m, x, None, True, case, monkeypatch, cell)


def _tol(case, cell):
    return dict(atol=module_tol(case, cell), rtol=module_tol(case, cell))


@pytest.mark.parametrize("backend", CHEAP)
@pytest.mark.parametrize("cell", CELL_IDS)
def test_batch_first_and_unbatched_match_reference(backend, cell, monkeypatch):
    case = use_backend(backend, cell, monkeypatch)
    ref = CELL_CASES[cell].reference
    m = make(cell, every_site(cell, tied=False), case.dtype, batch_first=True)
    m.record_masks = True
    x = torch.randn(B, T, I, dtype=case.dtype)
    out, state = m(x)
    ref_out, ref_state, _ = ref(m, x.transpose(0, 1), None, m.last_masks)
    torch.testing.assert_close(out, ref_out.transpose(0, 1), **_tol(case, cell))
    torch.testing.assert_close(state, ref_state, **_tol(case, cell))
    m.batch_first = False  # unbatched: (T, I) and a state without its batch dimension
    x, hx = torch.randn(T, I, dtype=case.dtype), state0(cell, 2, case.dtype, batch=1)
    hx = tuple(h[:, 0].detach() for h in hx) if isinstance(hx, tuple) else hx[:, 0].detach()
    out, state = m(x, hx)
    assert out.shape == (T, 2 * H)
    batched = tuple(h[:, None] for h in hx) if isinstance(hx, tuple) else hx[:, None]
    ref_out, ref_state, _ = ref(m, x[:, None], batched, m.last_masks)
    torch.testing.assert_close(out, ref_out[:, 0], **_tol(case, cell))
    unb = (lambda s: tuple(t[:, 0] for t in s)) if isinstance(hx, tuple) else (lambda s: s[:, 0])
    torch.testing.assert_close(state, unb(ref_state), **_tol(case, cell))


def _slice(m, key, b, n):
    """The recorded mask restricted to sequence b's first n steps (shapes per masks.py)."""
    if key.startswith("weight_hh"):
        return m
    if key.startswith("recurrent"):  # (T|1, G, B|1, H)
        return m[:n, :, b : b + 1] if m.shape[2] > 1 else m[:n]
    if m.dim() == 4:  # untied input (G, T|1, B|1, F)
        return m[:, :n, b : b + 1] if m.shape[2] > 1 else m[:, :n]
    return m[:n, b : b + 1] if m.shape[1] > 1 else m[:n]


def _each_sequence(cell, m, x, lengths, hx, padded, state, masks, sample, case):
    """Each sequence alone through the reference (its slice of the masks) equals its part
    of the packed run; steps past its end are zero."""
    for b, n in enumerate(lengths.tolist()):
        part = {k: _slice(v, k, b, n) for k, v in masks.items()} if sample else None
        h_b = None if hx is None else (tuple(h[:, b : b + 1] for h in hx)
                                        if isinstance(hx, tuple) else hx[:, b : b + 1])  # fmt: skip
        ro, rs, _ = CELL_CASES[cell].reference(m, x[:n, b : b + 1], h_b, part, sample=sample)
        torch.testing.assert_close(padded[:n, b : b + 1], ro, atol=module_tol(case, cell), rtol=0)
        assert (padded[n:, b] == 0).all()
        ours = state if isinstance(state, tuple) else (state,)
        theirs = rs if isinstance(rs, tuple) else (rs,)
        for s, r in zip(ours, theirs, strict=True):
            torch.testing.assert_close(s[:, b : b + 1], r, atol=module_tol(case, cell), rtol=0)


PACKED = {"everything": SCHEMES["everything"], "variational": SCHEMES["variational"],
          "recurrent_per_step": VARIANTS["recurrent-tied-per_step-per_sample"]}  # fmt: skip


@pytest.mark.parametrize("backend,cell,name", _params(PACKED))
def test_packed_input_matches_each_sequence_alone(cell, backend, name, monkeypatch):
    case = use_backend(backend, cell, monkeypatch)
    m = make(cell, _resolve(PACKED[name], cell), case.dtype)
    lengths = torch.tensor([4, 2, 1])
    x = torch.randn(T, B, I, dtype=case.dtype)
    hx = tuple(h.detach() for h in state0(cell, 2, case.dtype)) if CELLS[cell].has_cell else \
        state0(cell, 2, case.dtype).detach()  # fmt: skip
    m.record_masks = True
    out, state = m(pack_padded_sequence(x, lengths), hx)
    padded, _ = pad_packed_sequence(out)
    _each_sequence(cell, m, x, lengths, hx, padded, state, m.last_masks, True, case)


@pytest.mark.parametrize("backend", CHEAP)
@pytest.mark.parametrize("cell", CELL_IDS)
def test_packed_input_in_eval_matches_reference(cell, backend, monkeypatch):
    """Zoneout's expectation and classic scaling, each sequence's state carried past its
    end."""
    case = use_backend(backend, cell, monkeypatch)
    cand = 0.2 if cell_refusal(cell, RD(candidate=0.2)) is None else 0.0
    cfg = RD(zoneout_hidden=0.3, candidate=cand, recurrent=0.2, scaling="classic")
    m = make(cell, cfg, case.dtype).eval()
    lengths = torch.tensor([4, 2, 1])
    x = torch.randn(T, B, I, dtype=case.dtype)
    out, state = m(pack_padded_sequence(x, lengths))
    padded, _ = pad_packed_sequence(out)
    _each_sequence(cell, m, x, lengths, None, padded, state, {}, False, case)


@pytest.mark.parametrize("backend", [b for b in ALL if BACKEND_CASES[b].backend != "python"])
@pytest.mark.parametrize("cell", CELL_IDS)
def test_masks_and_rate_gradients_do_not_depend_on_the_backend(cell, backend, monkeypatch):
    """The engine draws every mask, whatever the backend: the same seed gives the python
    loop's masks, outputs and gradients; with concrete dropout also the rate gradients
    (the masks' gradients written by the loop)."""
    case = use_backend(backend, cell, monkeypatch)
    cfg = every_site(cell, tied=False, time="per_step", concrete=True, temperature=0.5)
    torch.manual_seed(0)
    m = CELL_CASES[cell].module(3, 5, 2, bidirectional=True, dropout=cfg).to(case.dtype)
    m.record_masks = True
    x0 = torch.randn(4, 2, 3, dtype=case.dtype)
    results = []
    for loop in (case.backend, "python"):
        monkeypatch.setenv("RNNDROP_LOOP", loop)
        x = x0.clone().requires_grad_()
        torch.manual_seed(7)
        out, state = m(x)
        states = state if isinstance(state, tuple) else (state,)
        loss = out.square().sum() + sum(s.sum() for s in states)
        names, params = zip(*m.named_parameters(), strict=True)
        grads = torch.autograd.grad(loss, [x, *params])
        results.append(([out, *states, *grads], dict(m.last_masks)))
    assert any(n.startswith("dropout_logit") for n in names)
    (ours, our_masks), (ref, ref_masks) = results
    assert our_masks.keys() == ref_masks.keys() and our_masks
    for k in our_masks:
        assert torch.equal(our_masks[k], ref_masks[k]), k
    tol = 1e-10 if case.dtype == F64 else 1e-5 * CELL_CASES[cell].f32_gain
    for a, b in zip(ours, ref, strict=True):
        scale = max(1.0, b.abs().max().item())  # rounding grows with the values' size
        torch.testing.assert_close(a, b, atol=tol * scale, rtol=tol)


@pytest.mark.parametrize("name", ["everything"])
@pytest.mark.parametrize("backend", CHEAP)
@pytest.mark.parametrize("cell", CELL_IDS)
def test_float32_matches_the_float64_reference(cell, backend, name, monkeypatch):
    """A larger layer in float32 (what training runs): rounding only."""
    use_backend(backend, cell, monkeypatch, F32)
    why = cell_refusal(cell, scheme(name, cell))
    if why is not None:
        pytest.skip(why)
    torch.manual_seed(2)
    m = CELL_CASES[cell].module(16, 24, 2, bidirectional=True, dropout=scheme(name, cell))
    x = torch.randn(12, 5, 16, requires_grad=True)
    gain = CELL_CASES[cell].f32_gain
    assert_matches_reference(m, CELL_CASES[cell].reference, x, None, True, 2e-5 * gain,
                             1e-4 * gain, F64)  # fmt: skip


# ---- drop-in: no dropout is torch's module ---------------------------------------------------


def _torch_cell(cell):
    torch_module = CELL_CASES[cell].torch_module
    if torch_module is None:
        pytest.skip(f"{cell} has no torch counterpart")
    return torch_module


def make_pair(cell, layers=2, bidir=False, batch_first=False, dtype=F32, bias=True, In=5, Hn=7):
    ref = _torch_cell(cell)(In, Hn, layers, bias=bias, batch_first=batch_first,
                            bidirectional=bidir).to(dtype)  # fmt: skip
    ours = CELL_CASES[cell].module(In, Hn, layers, bias=bias, batch_first=batch_first,
                                   bidirectional=bidir).to(dtype)  # fmt: skip
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def torch_inputs(cell, layers, bidir, batch_first, dtype, with_hx, T=6, B=3, In=5, Hn=7):
    x = torch.randn((B, T, In) if batch_first else (T, B, In), dtype=dtype, requires_grad=True)
    D = 2 if bidir else 1
    hx = None
    if with_hx:
        hs = [torch.randn(layers * D, B, Hn, dtype=dtype, requires_grad=True)
              for _ in range(2 if CELLS[cell].has_cell else 1)]  # fmt: skip
        hx = tuple(hs) if CELLS[cell].has_cell else hs[0]
    return x, hx


def run(model, x, hx):
    out, state = model(x, hx) if hx is not None else model(x)
    states = state if isinstance(state, tuple) else (state,)
    loss = out.square().sum() + states[0].sin().sum() + sum(s.cos().sum() for s in states[1:])
    hxs = () if hx is None else hx if isinstance(hx, tuple) else (hx,)
    return [out, *states, *torch.autograd.grad(loss, [x, *hxs, *model.parameters()])]


@pytest.mark.parametrize("cell", CELL_IDS)
def test_parameters_init_and_state_dicts_are_torchs(cell):
    torch_module = _torch_cell(cell)
    for layers, bidir, bias in itertools.product([1, 3], [False, True], [True, False]):
        torch.manual_seed(3)
        ref = torch_module(5, 7, layers, bias=bias, bidirectional=bidir)
        torch.manual_seed(3)
        ours = CELL_CASES[cell].module(5, 7, layers, bias=bias, bidirectional=bidir)
        assert [(n, p.shape) for n, p in ref.named_parameters()] == [
            (n, p.shape) for n, p in ours.named_parameters()
        ]
        for a, b in zip(ref.parameters(), ours.parameters(), strict=True):
            assert torch.equal(a, b)  # same initialisation, same order
        assert ours.weight_ih_l0.shape == (CELLS[cell].gates * 7, 5)  # G gate blocks
        assert list(ours.state_dict()) == list(ref.state_dict())
        ref.load_state_dict(ours.state_dict())  # both ways, strict
        ours.load_state_dict(ref.state_dict())
    x = torch.randn(4, 3, 5)
    ref = torch_module(5, 7, 2, bidirectional=True)
    ours = CELL_CASES[cell].module(5, 7, 2, bidirectional=True)
    ours.load_state_dict(ref.state_dict())  # torch -> rnndrop
    back = torch_module(5, 7, 2, bidirectional=True)
    back.load_state_dict(ours.state_dict())  # rnndrop -> torch
    assert torch.equal(back(x)[0], ref(x)[0]) and torch.equal(ours(x)[0], ref(x)[0])
    if cell != "lstm":  # only torch's LSTM has projections
        with pytest.raises(TypeError):
            CELL_CASES[cell].module(5, 7, proj_size=3)


_DROP_IN = list(itertools.product([1, 2], [False, True], [False, True], [False, True]))
# layers, bidirectional, batch_first, initial state: every pair of values of every two of them
_PAIRWISE = [(1, False, False, False), (1, True, True, True), (2, False, True, True),
             (2, True, False, True), (2, True, True, False), (2, True, True, True)]  # fmt: skip


@pytest.mark.parametrize(
    "layers,bidir,batch_first,with_hx,dtype",
    [(*p, F32) for p in _DROP_IN] + [(*p, F64) for p in _PAIRWISE],
)
@pytest.mark.parametrize("cell", CELL_IDS)
def test_fused_path_is_bitwise_torch(cell, layers, bidir, batch_first, with_hx, dtype):
    """Every combination in float32, every pair of values in float64."""
    ref, ours = make_pair(cell, layers, bidir, batch_first, dtype)
    x, hx = torch_inputs(cell, layers, bidir, batch_first, dtype, with_hx)
    for a, b in zip(run(ref, x, hx), run(ours, x, hx), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("cell", CELL_IDS)
def test_fused_path_without_bias_is_bitwise_torch(cell):
    ref, ours = make_pair(cell, 2, True, bias=False)
    x, hx = torch_inputs(cell, 2, True, False, F32, True)
    for a, b in zip(run(ref, x, hx), run(ours, x, hx), strict=True):
        assert torch.equal(a, b)


# the engine's combinations (layers, directions, batch_first, state) once, on python in
# float64; each compiled backend on every pair of them, in float64 and float32 (Triton: the
# layer level's "none" case)
_LOOP_GRID = {"python": [(*p, F64) for p in _DROP_IN]}


@pytest.mark.parametrize("backend,layers,bidir,batch_first,with_hx,dtype",
                         [(b, *p) for b in CHEAP
                          for p in _LOOP_GRID.get(b, [(*q, d) for d in (F64, F32)
                                                      for q in _PAIRWISE])])  # fmt: skip
@pytest.mark.parametrize("cell", CELL_IDS)
def test_loop_path_matches_torch(cell, backend, layers, bidir, batch_first, with_hx, dtype,
                                 monkeypatch):  # fmt: skip
    """The loop path forced with no mask computes torch's module: outputs and gradients."""
    case = use_backend(backend, cell, monkeypatch, dtype)
    ref, ours = make_pair(cell, layers, bidir, batch_first, dtype)
    ours.force_loop = True
    calls = spy(monkeypatch, case)
    x, hx = torch_inputs(cell, layers, bidir, batch_first, dtype, with_hx)
    tol = 1e-5 if dtype == F32 else 1e-10
    for a, b in zip(run(ref, x, hx), run(ours, x, hx), strict=True):
        torch.testing.assert_close(b, a, atol=tol, rtol=tol)
    assert len(calls) == layers * (2 if bidir else 1)


@pytest.mark.parametrize("backend", CHEAP)
@pytest.mark.parametrize("cell", CELL_IDS)
def test_loop_path_without_bias_matches_torch(cell, backend, monkeypatch):
    use_backend(backend, cell, monkeypatch)
    ref, ours = make_pair(cell, 2, True, dtype=F64, bias=False)
    ours.force_loop = True
    x, hx = torch_inputs(cell, 2, True, False, F64, True)
    for a, b in zip(run(ref, x, hx), run(ours, x, hx), strict=True):
        torch.testing.assert_close(b, a, atol=1e-10, rtol=1e-10)


def _same(a, b, exact: bool):
    """Bitwise (the fused op), or to float64 rounding (the loop)."""
    if exact:
        assert torch.equal(b, a)
    else:
        torch.testing.assert_close(b, a, atol=1e-10, rtol=0)


@pytest.mark.parametrize("force_loop", [False, True])
@pytest.mark.parametrize("cell", CELL_IDS)
def test_unbatched_input_matches_torch(cell, force_loop):
    """(T, I) input and a state without batch dimension: outputs and gradients."""
    ref, ours = make_pair(cell, 2, True, dtype=F64)
    ours.force_loop = force_loop
    x = torch.randn(6, 5, dtype=F64, requires_grad=True)
    hs = [torch.randn(4, 7, dtype=F64, requires_grad=True)
          for _ in range(2 if CELLS[cell].has_cell else 1)]  # fmt: skip
    for hx in (None, tuple(hs) if CELLS[cell].has_cell else hs[0]):
        want, got = run(ref, x, hx), run(ours, x, hx)
        assert got[0].shape == want[0].shape == (6, 14) and got[1].shape == want[1].shape == (4, 7)
        for a, b in zip(want, got, strict=True):
            _same(a, b, not force_loop)


@pytest.mark.parametrize("force_loop", [False, True])
@pytest.mark.parametrize("enforce_sorted", [True, False])
@pytest.mark.parametrize("bidir", [False, True])
@pytest.mark.parametrize("cell", CELL_IDS)
def test_packed_sequence_matches_torch(cell, force_loop, enforce_sorted, bidir):
    ref, ours = make_pair(cell, 2, bidir, True, F64)
    ours.force_loop = force_loop
    lengths = torch.tensor([6, 4, 4, 1]) if enforce_sorted else torch.tensor([4, 6, 1, 4])
    x = torch.randn(4, 6, 5, dtype=F64)
    packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=enforce_sorted)
    D = 2 if bidir else 1
    hs = [torch.randn(2 * D, 4, 7, dtype=F64) for _ in range(2 if CELLS[cell].has_cell else 1)]
    hx = tuple(hs) if CELLS[cell].has_cell else hs[0]
    (a, sa), (b, sb) = ref(packed, hx), ours(packed, hx)
    assert torch.equal(a.batch_sizes, b.batch_sizes)
    assert (a.sorted_indices is None) == (b.sorted_indices is None)
    if a.sorted_indices is not None:
        assert torch.equal(a.sorted_indices, b.sorted_indices)
    sa, sb = (sa, sb) if isinstance(sa, tuple) else ((sa,), (sb,))
    for u, v in ((a.data, b.data), *zip(sa, sb, strict=True)):
        _same(u, v, not force_loop)


@pytest.mark.parametrize("cell", CELL_IDS)
def test_float_dropout_means_what_torch_means(cell):
    """``dropout=p`` as torch reads it: between layers, a fresh mask per step; eval is
    torch's module exactly."""
    m = CELL_CASES[cell].module(5, 7, 2, dropout=0.3)
    assert m.dropout.between_layers == 0.3 and m.dropout.time == "per_step"
    assert m.dropout.input == m.dropout.output == m.dropout.recurrent == 0
    assert CELL_CASES[cell].module(5, 7, 2, dropout=0.0).dropout.any is False
    m = CELL_CASES[cell].module(5, 7, 2, dropout=0.4).double()
    m.record_masks = True
    x = torch.randn(6, 3, 5, dtype=F64)
    m(x)
    assert set(m.last_masks) == {"between_layers/l1"}
    mask = m.last_masks["between_layers/l1"]
    assert mask.shape == (6, 3, 7)
    assert not torch.equal(mask[0], mask[1])
    keep = keep_probability(0.4)  # the rate as the mask bits realise it
    assert set(mask.unique().tolist()) <= {0.0, 1 / keep}
    m.eval()  # eval: exactly torch's module
    ref = _torch_cell(cell)(5, 7, 2, dropout=0.4).double().eval()
    ref.load_state_dict(m.state_dict())
    assert torch.equal(m(x)[0], ref(x)[0])


# ---- recorded masks -------------------------------------------------------------------------


@pytest.mark.parametrize("cell", CELL_IDS)
def test_recorded_mask_shapes_use_the_cells_gates(cell):
    G, Tn, Bn, In, Hn = CELLS[cell].gates, 5, 3, 4, 6
    shapes = {
        "variational_untied": {"input/l0": (G, 1, Bn, In), "between_layers/l1": (G, 1, Bn, Hn),
                               "recurrent/l0": (1, G, Bn, Hn), "recurrent/l1": (1, G, Bn, Hn),
                               "output": (1, Bn, Hn)},
        # folded into W_ih / W_hh columns, recorded per gate
        "untied_per_batch": {"input/l0": (G, 1, 1, In), "between_layers/l1": (G, 1, 1, Hn),
                             "recurrent/l0": (1, G, 1, Hn), "output": (1, 1, Hn)},
        "variational_per_batch": {"recurrent/l0": (1, 1, 1, Hn), "input/l0": (1, 1, In)},
        "naive_recurrent": {"recurrent/l0": (Tn, 1, Bn, Hn), "input/l0": (Tn, Bn, In)},
        "recurrent_per_step_per_batch": {"recurrent/l1": (Tn, 1, 1, Hn)},
        "semeniuta": {"candidate/l0": (Tn, Bn, Hn)},
        "semeniuta_per_sequence": {"candidate/l1": (1, Bn, Hn)},
        "weight_drop": {"weight_hh/l0": (G * Hn, Hn), "weight_hh/l1": (G * Hn, Hn)},
        "zoneout": {"zoneout_hidden/l0": (Tn, Bn, Hn), "zoneout_hidden/l1": (Tn, Bn, Hn)},
    }  # fmt: skip
    configs = {"variational_untied": RD.variational(0.3, tied=False),
               "untied_per_batch": RD.variational(0.3, tied=False).replace(batch="per_batch"),
               "variational_per_batch": RD.variational(0.3).replace(batch="per_batch"),
               "naive_recurrent": RD.naive_recurrent(0.3),
               "recurrent_per_step_per_batch": RD(recurrent=0.3, time="per_step",
                                                  batch="per_batch"),
               "semeniuta": RD.semeniuta(0.3),
               "semeniuta_per_sequence": RD.semeniuta(0.3, time="per_sequence"),
               "weight_drop": RD.weight_drop(0.4), "zoneout": RD(zoneout_hidden=0.2)}  # fmt: skip
    checked = 0
    for name, want in shapes.items():
        if cell_refusal(cell, configs[name]) is not None:  # Semeniuta on the Elman RNN
            continue
        m = CELL_CASES[cell].module(In, Hn, 2, dropout=configs[name]).double()
        m.record_masks = True
        m(torch.randn(Tn, Bn, In, dtype=F64))
        for key, shape in want.items():
            assert tuple(m.last_masks[key].shape) == shape, (name, key)
            checked += 1
    assert checked >= 15


@pytest.mark.parametrize("cell", CELL_IDS)
def test_untied_gate_masks_differ(cell):
    G = CELLS[cell].gates
    if G == 1:
        pytest.skip(f"{cell} has one gate block: tied and untied are the same masks")
    m = CELL_CASES[cell].module(30, 40, dropout=RD(input=0.3, recurrent=0.3, tied=False))
    m.record_masks = True
    m(torch.randn(5, 16, 30))
    inp, rec = m.last_masks["input/l0"], m.last_masks["recurrent/l0"].transpose(0, 1)
    for gates in (inp, rec):
        assert gates.shape[0] == G
        for a, b in itertools.combinations(range(G), 2):
            assert not torch.equal(gates[a], gates[b])


# ---- layer level: the kernel contract, each compiled backend against the python loop --------


def _layer_backend(backend, cell, monkeypatch, dtype=None):
    case = use_backend(backend, cell, monkeypatch, dtype)
    monkeypatch.delenv("RNNDROP_LOOP")  # rnn_layer names its backend
    return case, CELLS[cell]


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("case_name", list(LAYER_CASES))
@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("cell", CELL_IDS)
def test_layer_site_matches_python(cell, backend, case_name, reverse, monkeypatch):
    """Every mask layout of the contract, each site alone and all together, in every dtype
    the backend runs; cheap backends run no masks and all sites together also without
    ``W_ih`` (x is the projection) and without biases (every backend: the test below)."""
    case, c = _layer_backend(backend, cell, monkeypatch)
    why = layer_case_refusal(cell, case_name)
    if why is not None:
        pytest.skip(why)
    for dtype in case.layer_dtypes:
        # the input projection and bias variants too (each site alone: with one; all
        # together and none: with every one)
        full = case.cheap and dtype == F64 and (case_name == "none" or "everything" in case_name)
        for projected, bias in (
            itertools.product([False, True], [True, False]) if full else [(False, True)]
        ):
            torch.manual_seed(0)
            masks = make_masks(c, case_name, LT, LB, LI, LH, dtype)
            if projected:
                masks.input = None  # input masks act on x before the projection
            leaves = make_leaves(c, projected, bias, LT, LB, LI, LH, dtype)
            tol = layer_tol(case, dtype, cell)
            assert_layer_agrees(case.backend, c, leaves, masks, reverse, tol)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("projected", [False, True], ids=["w_ih", "projected"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("cell", CELL_IDS)
def test_layer_projection_and_bias_variants(cell, backend, reverse, projected, bias,
                                            monkeypatch):  # fmt: skip
    """Every site on, in the lowest precision the backend runs (cheap backends cross every
    case with these in float64 above)."""
    case, c = _layer_backend(backend, cell, monkeypatch)
    Tn, Bn, In, Hn, dtype = 3, 2, 3, 6, case.layer_dtypes[-1]
    masks = make_masks(c, "everything_untied", Tn, Bn, In, Hn, dtype)
    if projected:
        masks.input = None
    leaves = make_leaves(c, projected, bias, Tn, Bn, In, Hn, dtype)
    assert_layer_agrees(case.backend, c, leaves, masks, reverse, layer_tol(case, dtype, cell))


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("cell", CELL_IDS)
def test_layer_shapes(cell, backend, monkeypatch):
    """The backend's edge shapes (one step, one sample, one unit, sizes past a vector width
    or a tile), both directions."""
    case, c = _layer_backend(backend, cell, monkeypatch)
    # no masks runs the compiled loop's unmasked row kernels (cheap backends, first dtype)
    runs = [("everything_untied", d) for d in case.layer_dtypes]
    runs += [("none", case.layer_dtypes[0])] if case.cheap else []
    for (Tn, Bn, In, Hn), (name, dtype), reverse in itertools.product(
        case.shapes, runs, (False, True)
    ):
        masks = make_masks(c, name, Tn, Bn, In, Hn, dtype)
        leaves = make_leaves(c, False, True, Tn, Bn, In, Hn, dtype)
        assert_layer_agrees(case.backend, c, leaves, masks, reverse, layer_tol(case, dtype, cell))


@pytest.mark.parametrize("wants", ["x", "weights", "state"])
@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("cell", CELL_IDS)
def test_layer_partial_gradients(cell, backend, wants, monkeypatch):
    """Only some leaves require grad: only those gradients, still equal to python's."""
    case, c = _layer_backend(backend, cell, monkeypatch)
    dtype = case.layer_dtypes[0]
    leaves = make_leaves(c, False, True, 3, 2, 3, 5, dtype)
    for k, t in enumerate(leaves):  # a cell's own parameters (k >= 7) are weights
        if t is not None:
            t.requires_grad_({"x": k == 0, "weights": k in (1, 2, 3, 4) or k >= 7,
                              "state": k in (5, 6)}[wants])  # fmt: skip
    masks = make_masks(c, "everything_untied", 3, 2, 3, 5, dtype)
    assert_layer_agrees(case.backend, c, leaves, masks, True, layer_tol(case, dtype, cell))


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("cell", CELL_IDS)
def test_layer_gradient_through_the_last_cell_state_only(cell, backend, monkeypatch):
    """No gradient reaches h_seq (dh_seq is None in backward): only c_last is used."""
    if not CELLS[cell].has_cell:
        pytest.skip(f"{cell} has no cell state")
    case, c = _layer_backend(backend, cell, monkeypatch)
    dtype = case.layer_dtypes[0]
    masks = make_masks(c, "everything_untied", 3, 2, 3, 5, dtype)
    leaves = make_leaves(c, False, True, 3, 2, 3, 5, dtype)
    assert_layer_agrees(case.backend, c, leaves, masks, False, layer_tol(case, dtype, cell), False)


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("case_name", ["none", "recurrent_tied_shared", "everything_untied"])
@pytest.mark.parametrize("backend", [b for b in COMPILED if BACKEND_CASES[b].cheap])
@pytest.mark.parametrize("cell", CELL_IDS)
def test_layer_saved_tensors_match_the_contract(cell, backend, case_name, reverse, monkeypatch):
    """acts, h_seq, c_seq, ct_seq, hm_seq and hn_seq in the contract's layouts, equal to the
    python loop's; a backward with no gradient from the output is all zeros."""
    case, c = _layer_backend(backend, cell, monkeypatch, F64)
    leaves = make_leaves(c, False, True, LT, LB, LI, LH, F64)
    x, w_ih, b_x, w_hh, b_h, h0, c0, *extra = (t if t is None else t.detach() for t in leaves)
    masks = make_masks(c, case_name, LT, LB, LI, LH, F64)
    kw = {"extra": tuple(extra)} if extra else {}
    inp = LayerInputs(c, x, w_ih, b_x, w_hh, b_h, h0, c0, masks, reverse, **kw)
    saved = BACKENDS[case.backend].forward(inp)
    saved_p = BACKENDS["python"].forward(inp)
    for a, b in zip(saved.tensors(), saved_p.tensors(), strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            assert a.shape == b.shape and a.is_contiguous()
            torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)
    g = BACKENDS[case.backend].backward(inp, saved, None, None, True, True)
    grads = (g.dx, g.dw_ih, g.db_x, g.dw_hh, g.db_h, g.dh0, g.dc0)
    for t, leaf in zip(grads, (x, w_ih, b_x, w_hh, b_h, h0, c0), strict=True):
        assert (t is None) == (leaf is None)  # a gradient exactly for each input present
        assert t is None or t.abs().max() == 0


@pytest.mark.parametrize("projected", [False, True], ids=["w_ih", "projected"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("backend", [b for b in COMPILED if F64 in BACKEND_CASES[b].layer_dtypes])
@pytest.mark.parametrize("cell", CELL_IDS)
def test_layer_gradcheck(cell, backend, reverse, projected, monkeypatch):
    """The hand-written backward against finite differences (float64), every mask on,
    zoneout with fractional weights."""
    case, c = _layer_backend(backend, cell, monkeypatch, F64)
    Tn, Bn, In, Hn = 3, 2, 3, 2
    leaves = make_leaves(c, projected, True, Tn, Bn, In, Hn, F64)
    masks = make_masks(c, "everything_untied", Tn, Bn, In, Hn, F64)
    masks.zoneout_h = torch.rand(Tn, Bn, Hn, dtype=F64)  # fractional weights too
    if projected:
        masks.input = None
    present = [t for t in leaves if t is not None]

    def f(*args):
        it = iter(args)
        full = [None if t is None else next(it) for t in leaves]
        h_seq, c_last = layer_call(c, full, masks, reverse, case.backend)
        return h_seq if c_last is None else (h_seq, c_last)

    assert torch.autograd.gradcheck(f, present, atol=1e-7, rtol=1e-5)


def test_layer_masks_cover_the_loop_sites():
    """Every LayerMasks field carries a layer site of SITES, every site that needs the loop
    has a field, and the layer-level cases (derived from both) run each field alone in
    each of its layouts."""
    from rnndrop.kernels import LayerMasks

    carried = {LayerMasks.site(n) for n in LayerMasks.names()}
    assert carried <= set(LAYER_SITES)
    assert {n for n, s in SITES.items() if s.path in ("loop", "loop_always")} <= carried
    alone = [(next(iter(c)), next(iter(c.values()))) for c in LAYER_CASES.values() if len(c) == 1]
    for name in LayerMasks.names():
        assert field_layouts(name)
        for layout in field_layouts(name).values():
            assert (name, layout) in alone
