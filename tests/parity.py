"""The parity harness's registries (tests/test_parity.py): cells, backends, site variants.

Every combination the harness runs is derived from the library's own registries:
:data:`rnndrop.nn.cells.CELLS` (cells), :data:`rnndrop.kernels.BACKENDS` (loop backends) and
:data:`rnndrop.config.SITES` (dropout sites). What the tests add is one entry per cell
(:data:`CELL_CASES`: its module and its independent reference in tests/reference.py) and,
only where a backend needs more than float64 on CPU, one per backend
(:data:`BACKEND_CASES`). A combination the library refuses is skipped with the library's
own reason (:func:`cell_refusal`, :func:`backend_refusal`), never left out.

A new cell is one line of :data:`CELL_CASES`, as ``"layernorm_lstm"`` is (no torch
counterpart: the drop-in tests skip, saying so); its own parameters (``Cell.extra_params``,
``LayerInputs.extra``) and the absence of a fused op (every layer loops) are read from its
``Cell``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch
from reference import reference_gru, reference_layernorm_lstm, reference_lstm, reference_rnn
from torch import Tensor, nn

from rnndrop.config import SITES
from rnndrop.config import RecurrentDropout as RD
from rnndrop.kernels import BACKENDS, LayerInputs, LayerMasks
from rnndrop.nn import GRU, LSTM, RNN, LayerNormLSTM
from rnndrop.nn.cells import CELLS

F64, F32 = torch.float64, torch.float32


# ---- cells ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CellCase:
    """How the harness builds and checks one cell of :data:`CELLS`.

    Attributes:
        module: rnndrop's layer, called as ``module(I, H, num_layers, **kwargs)`` with
            torch's keyword arguments (``bias``, ``batch_first``, ``dropout``,
            ``bidirectional``).
        reference: its independent reference in tests/reference.py,
            ``reference(module, x, hx, masks, sample=...) -> (out, state, pre)``.
        torch_module: torch's module it drops in for (same arguments, no dropout), or None
            where torch has none (the drop-in tests then skip, saying so).
        f32_gain: how much the cell magnifies float32 rounding, a factor on the float32
            tolerances (a LayerNorm divides by a row's spread, which a dropped input can
            leave small).
    """

    module: Callable[..., nn.Module]
    reference: Callable
    torch_module: Callable[..., nn.Module] | None = None
    f32_gain: float = 1.0


#: One entry per cell of rnndrop.nn.cells.CELLS (test_parity checks the keys agree).
CELL_CASES: dict[str, CellCase] = {
    "lstm": CellCase(LSTM, reference_lstm, nn.LSTM),
    "gru": CellCase(GRU, reference_gru, nn.GRU),
    "rnn_tanh": CellCase(partial(RNN, nonlinearity="tanh"), reference_rnn,
                         partial(nn.RNN, nonlinearity="tanh")),
    "rnn_relu": CellCase(partial(RNN, nonlinearity="relu"), reference_rnn,
                         partial(nn.RNN, nonlinearity="relu")),
    # 10: LN(c̃) of a row the cell mask (Moon et al.) has mostly dropped: float32 python, cpp
    # and triton differ by up to 8e-5 of a gradient's size with learned (concrete) masks
    "layernorm_lstm": CellCase(LayerNormLSTM, reference_layernorm_lstm, f32_gain=10.0),
}  # fmt: skip


def cell_refusal(cell: str, cfg: RD | None) -> str | None:
    """The library's reason a ``cell`` layer refuses ``cfg`` (a site it lacks), or None."""
    if cfg is None:
        return None
    try:
        cfg.check_cell(cell)
    except ValueError as e:
        return str(e)
    return None


# ---- backends ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class BackendCase:
    """One loop backend as the harness runs it.

    Attributes:
        backend: its name in :data:`rnndrop.kernels.BACKENDS`.
        dtype: the dtype of the module-level tests (against the float64 reference).
        tol: ``atol`` and ``rtol`` of those tests.
        layer_dtypes: dtypes of the layer-level tests (against the ``python`` backend).
        env: environment variables it runs under (Triton's interpreter on CPU).
        f32_layer_tol: ``(atol, rtol)`` of the float32 layer-level tests.
        cheap: runs fast on CPU. Else (Triton's interpreter) the module level runs every
            site of the cell at once, packed (against the reference) and against the
            python loop (same masks, every gradient, concrete rates); the single sites,
            eval's expectations and no masks are checked at the layer level, one layer
            call each.
        shapes: ``(T, B, I, H)`` of the layer-level shape tests.
    """

    backend: str
    dtype: torch.dtype = F64
    tol: float = 1e-10
    layer_dtypes: tuple[torch.dtype, ...] = (F64, F32)
    env: dict[str, str] = field(default_factory=dict)
    f32_layer_tol: tuple[float, float] = (2e-5, 1e-4)
    cheap: bool = True
    shapes: tuple[tuple[int, int, int, int], ...] = (
        (1, 1, 2, 3), (1, 4, 3, 5), (7, 1, 3, 4), (6, 9, 5, 33),  # one step, one sample, odd H
    )  # fmt: skip


def _triton(path: str) -> BackendCase:
    from rnndrop.kernels.triton import MAX_H

    # float32 only; H = 1, a batch over two programs, H filling / overrunning a 16-tile, MAX_H
    return BackendCase("triton", F32, 1e-5, (F32,), {"TRITON_INTERPRET": "1",
                       "RNNDROP_TRITON_PATH": path}, (1e-5, 1e-5), False,
                       ((1, 1, 2, 1), (2, 17, 3, 8), (5, 2, 2, 16), (2, 1, 3, 20),
                        (2, 1, 2, MAX_H)))  # fmt: skip


#: Backends that need more than the default (float64 on CPU, no environment). A backend of
#: BACKENDS without an entry is run with the defaults under its own name.
BACKEND_CASES: dict[str, BackendCase] = {
    "python": BackendCase("python"),
    "cpp": BackendCase("cpp"),
    "triton-loop": _triton("loop"),  # the whole loop in one launch
    "triton-step": _triton("step"),  # a GEMM and one fused kernel per step
}
for _name in BACKENDS:
    if not any(c.backend == _name for c in BACKEND_CASES.values()):
        BACKEND_CASES[_name] = BackendCase(_name)


def probe(cell: str, dtype: torch.dtype, H: int = 3) -> LayerInputs:
    """A tiny layer of ``cell`` on CPU: what a backend is asked whether it can run."""
    c = CELLS[cell]
    x = torch.zeros(2, 1, c.gates * H, dtype=dtype)
    h = torch.zeros(1, H, dtype=dtype)
    return LayerInputs(c, x, None, None, torch.zeros(c.gates * H, H, dtype=dtype), None, h,
                       h if c.has_cell else None, LayerMasks())  # fmt: skip


def backend_refusal(case: BackendCase, cell: str, dtype: torch.dtype | None = None) -> str | None:
    """The backend's own reason it cannot run ``cell`` (call under the case's environment)."""
    why = BACKENDS[case.backend].unavailable(probe(cell, dtype or case.dtype))
    return None if why is None else f"{case.backend}: {why}"


# ---- sites ------------------------------------------------------------------------------------

#: The recurrent layer's sites (the model's, such as the embedding, act outside it).
LAYER_SITES = [n for n, s in SITES.items() if s.path != "model"]
MODEL_SITES = [n for n, s in SITES.items() if s.path == "model"]
RATE = 0.5  # every site's rate in the one-site variants


def site_variants() -> dict[str, RD]:
    """Each layer site alone, under every option that applies to it (from its SITES entry):
    tied / untied (``gated``) x per-step / per-sequence x per-sample / per-batch
    (``policy``); and once with learned rates (concrete dropout)."""
    out = {}
    for name in LAYER_SITES:
        site = SITES[name]
        ties = (True, False) if site.gated else (True,)
        policies = (list(itertools.product(("per_sequence", "per_step"),
                                           ("per_sample", "per_batch")))
                    if site.policy else [(None, None)])  # fmt: skip
        for tied, (time, batch) in itertools.product(ties, policies):
            kw = {name: RATE}
            parts = [name]
            if site.gated:
                kw["tied"] = tied
                parts.append("tied" if tied else "untied")
            if site.policy:
                kw.update(time=time, batch=batch)
                parts += [time, batch]
            out["-".join(parts)] = RD(**kw)
        out[f"{name}-concrete"] = RD(**{name: RATE}, concrete=True, temperature=0.5)
    return out


def every_site(cell: str, **kw) -> RD:
    """Every layer site the cell has, dropout sites at 0.2 and zoneout at 0.1."""
    rates = {n: 0.2 if SITES[n].scaled else 0.1 for n in LAYER_SITES
             if SITES[n].cells is None or cell in SITES[n].cells}  # fmt: skip
    if kw.get("scaling") == "classic":  # classic scaling: the dropout sites only
        rates = {n: r for n, r in rates.items() if SITES[n].scaled}
    return RD(**rates, **kw)


#: Schemes: the sites together (the interactions one-site variants do not reach). A value is
#: a config or a function of the cell's name. A scheme that sets a site the cell lacks is
#: skipped with the library's reason.
SCHEMES: dict[str, RD | Callable[[str], RD]] = {
    "naive": RD.naive(0.3),  # input, between layers and output, a fresh mask per step
    "variational": RD.variational(0.3),
    "zoneout": lambda cell: RD.zoneout(0.2, 0.4 if CELLS[cell].has_cell else 0.0),
    "awd": RD.awd(0.0, 0.3, 0.2, 0.25, 0.4),
    "everything": partial(every_site, tied=False),
    # a loop layer whose untied per-batch input masks are folded into W_ih's columns
    "loop_with_folded_input": RD(zoneout_hidden=0.2, input=0.3, tied=False, batch="per_batch"),
    "classic": partial(every_site, scaling="classic"),
}


def eval_variants() -> dict[str, RD]:
    """Each site whose eval runs the time loop, alone in deterministic eval (SITES' path
    ``loop``: under classic scaling; ``loop_always``: zoneout's expectation). The others'
    eval is a constant factor or none, which the ``classic`` and ``everything`` schemes
    check all at once."""
    return {f"{n}-eval": RD(**{n: RATE}, **({"scaling": "classic"} if SITES[n].scaled else {}))
            for n in LAYER_SITES if SITES[n].path in ("loop", "loop_always")}  # fmt: skip


def scheme(name: str, cell: str) -> RD:
    s = SCHEMES[name]
    return s if isinstance(s, RD) else s(cell)


def expected_keys(cfg: RD, layers: int, bidir: bool) -> set[str]:
    """The recorded mask names a sampled forward with ``cfg`` must produce (SITES' layers)."""
    keys = set()
    dirs = ("", "_reverse") if bidir else ("",)
    for name in cfg.active_sites():
        where = SITES[name].layers
        if where == "first":
            keys.add(f"{name}/l0")
        elif where == "inner":
            keys |= {f"{name}/l{layer}" for layer in range(1, layers)}
        elif where == "last":
            keys.add(name)
        elif where == "all":
            keys |= {f"{name}/l{layer}{d}" for layer in range(layers) for d in dirs}
    return keys


# ---- layer level: masks and leaves as the engine hands them to a backend ----------------------

#: A mask's layouts at the layer level, from where its LayerMasks field acts and its site's
#: SITES options: ``time`` "T" (per step) or "1" (shared over time, where ``policy``
#: applies); ``batch`` "B" or "1" (per sample / per batch: only the projection's masks reach
#: a backend per batch); ``tie`` "tied" or "untied" (one mask per gate group, where
#: ``gated`` applies; the projection's tied masks never reach a backend); a zoneout weight
#: (a step field absent as 0): ``zone`` "sampled" (0/1 per step, a padded step carrying
#: exactly) or "eval" (z, shared).
_TIME = {"T": "per_step", "1": "shared"}
_BATCH = {"B": "per_sample", "1": "per_batch"}


def field_layouts(name: str) -> dict[str, dict[str, str]]:
    """The layouts of one :class:`LayerMasks` field, by name; the first is per step, per
    sample and untied (``everything_untied``'s), :func:`tied_layout` ``everything_tied``'s."""
    where, site = LayerMasks.where(name), SITES[LayerMasks.site(name)]
    times = ("T", "1") if site.policy else ("T",)
    if where == "projection":
        return {f"untied_{_TIME[t]}_{_BATCH[b]}": dict(time=t, batch=b, tie="untied")
                for t in times for b in ("B", "1")}  # fmt: skip
    if where == "recurrent":
        ties = ("untied", "tied") if site.gated else ("tied",)
        return {f"{tie}_{_TIME[t]}": dict(time=t, tie=tie) for tie in ties for t in times}
    if LayerMasks.absent(name) == 0:  # zoneout's weight of the previous value
        return {"sampled": dict(zone="sampled"), "eval": dict(zone="eval")}
    return {_TIME[t]: dict(time=t) for t in times}


def tied_layout(name: str) -> dict[str, str]:
    """``everything_tied``'s layout of a field: shared over time, per sample, tied where it
    can be; zoneout in eval."""
    layouts = list(field_layouts(name).values())
    shared = [lay for lay in layouts if lay.get("time", "1") == "1"
              and lay.get("batch", "B") == "B" and lay.get("zone", "eval") == "eval"]  # fmt: skip
    shared = shared or layouts
    return next((lay for lay in shared if lay.get("tie") == "tied"), shared[0])


def _layer_cases() -> dict[str, dict[str, dict[str, str]]]:
    """case -> {LayerMasks field: layout}: no masks; each field alone in each of its layouts;
    every zoneout weight in eval; every field together, per step and untied, and shared
    and tied."""
    names = LayerMasks.names()
    cases: dict[str, dict] = {"none": {}}
    for name in names:
        for variant, layout in field_layouts(name).items():
            cases[f"{name}_{variant}"] = {name: layout}
    weights = [n for n in names if LayerMasks.where(n) == "step" and LayerMasks.absent(n) == 0]
    cases["zoneout_eval"] = {n: dict(zone="eval") for n in weights}
    cases["everything_untied"] = {n: next(iter(field_layouts(n).values())) for n in names}
    cases["everything_tied"] = {n: tied_layout(n) for n in names}
    return cases


#: Every layer-level case (:func:`_layer_cases`), derived from LayerMasks and SITES.
LAYER_CASES = _layer_cases()


def layer_case_refusal(cell: str, case: str) -> str | None:
    """A one-site case on a site the cell lacks: the library's reason (cases of several
    masks take the sites the cell has)."""
    spec = LAYER_CASES[case]
    if len(spec) != 1:
        return None
    return cell_refusal(cell, RD(**{LayerMasks.site(next(iter(spec))): 0.3}))


def _drop(shape, p, dtype):
    """An inverted-dropout mask: 0 or 1/(1-p)."""
    return (torch.rand(shape) >= p).to(dtype) / (1 - p)


def _zone(kind, T, B, H, dtype):
    if kind == "sampled":
        z = (torch.rand(T, B, H) < 0.4).to(dtype)
        z[-1, 0] = 1.0  # a padded step: carry the state exactly
        return z
    return torch.full((1, B, H), 0.3, dtype=dtype)


def _mask(name: str, layout: dict, G: int, T: int, B: int, I: int, H: int, dtype) -> Tensor:
    """One field's mask in ``layout``, shaped as LayerMasks documents it."""
    if "zone" in layout:
        return _zone(layout["zone"], T, B, H, dtype)
    steps = T if layout["time"] == "T" else 1
    where = LayerMasks.where(name)
    if where == "projection":
        return _drop((G, steps, B if layout["batch"] == "B" else 1, I), 0.3, dtype)
    if where == "recurrent":
        return _drop((steps, 1 if layout["tie"] == "tied" else G, B, H), 0.3, dtype)
    return _drop((steps, B, H), 0.3, dtype)


_DRAW_ORDER = ("recurrent", "projection", "step")


def make_masks(cell, case: str, T: int, B: int, I: int, H: int, dtype=F32) -> LayerMasks:
    """The :class:`LayerMasks` of ``case`` for a :class:`~rnndrop.nn.cells.Cell`, leaving out
    the sites the cell lacks."""
    m = LayerMasks()
    spec = LAYER_CASES[case]
    # drawn recurrent first, then the projection's, then the step masks: the order the cases
    # were written in before they were derived, so every case draws the masks it drew then
    # (float16 / bfloat16 tolerances in test_triton.py were checked on those draws)
    for name in sorted(spec, key=lambda n: _DRAW_ORDER.index(LayerMasks.where(n))):
        layout = spec[name]
        site = SITES[LayerMasks.site(name)]
        if site.cells is None or cell.name in site.cells:
            setattr(m, name, _mask(name, layout, cell.gates, T, B, I, H, dtype))
    return m


def make_leaves(cell, projected: bool, bias: bool, T, B, I, H, dtype=F32) -> list:
    """x, w_ih, b_x, w_hh, b_h, h0, c0 (None where absent) and a cell's own parameters
    (``LayerInputs.extra``, none for torch's cells), as the engine hands them: the biases
    split by the cell (``split_bias``, ``extra_inputs``)."""
    G = cell.gates

    def leaf(*shape, scale=0.5):
        return (torch.randn(*shape, dtype=dtype) * scale).requires_grad_()

    def free(t):
        return None if t is None else t.detach().requires_grad_()

    b_ih, b_hh = (leaf(G * H), leaf(G * H)) if bias else (None, None)
    b_x, b_h = cell.split_bias(b_ih, b_hh) if bias else (None, None)
    if projected:  # x is the input projection, its bias included
        x, w_ih, b_x = leaf(T, B, G * H, scale=1.0), None, None
    else:
        x, w_ih = leaf(T, B, I, scale=1.0), leaf(G * H, I)
    c0 = leaf(B, H) if cell.has_cell else None
    leaves = [x, w_ih, free(b_x), leaf(G * H, H), free(b_h), leaf(B, H), c0]
    extra_inputs = getattr(cell, "extra_inputs", None)
    if extra_inputs is not None:  # the cell's own parameters, near their initial values
        own = [torch.full((units * H,), init, dtype=dtype) + 0.2 * torch.randn(units * H,
               dtype=dtype) for _, units, init in cell.extra_params]  # fmt: skip
        leaves += [free(t) for t in extra_inputs(b_ih, b_hh, *own)]
    return leaves


def layer_call(cell, leaves, masks, reverse, backend):
    """:func:`rnndrop.kernels.rnn_layer` on ``leaves`` (:func:`make_leaves`)."""
    from rnndrop.kernels import rnn_layer

    x, w_ih, b_x, w_hh, b_h, h0, c0, *extra = leaves
    kw = {"extra": tuple(extra)} if extra else {}
    return rnn_layer(cell, x, w_ih, b_x, w_hh, b_h, h0, c0, masks, reverse=reverse,
                     backend=backend, **kw)  # fmt: skip


def run_layer(backend: str, cell, leaves, masks, reverse, weight, use_h=True) -> list:
    """``h_seq``, ``c_last`` and the gradients of a weighted loss w.r.t. every leaf that
    requires grad, from :func:`rnndrop.kernels.rnn_layer` on ``backend``."""
    h_seq, c_last = layer_call(cell, leaves, masks, reverse, backend)
    assert (c_last is None) == (not cell.has_cell)
    loss = (h_seq * weight).sum() if use_h else 0.0
    if c_last is not None:
        loss = loss + (c_last * weight[0]).sum()
    present = [t for t in leaves if t is not None and t.requires_grad]
    return [h_seq, c_last, *torch.autograd.grad(loss, present)]


def assert_layer_agrees(backend: str, cell, leaves, masks, reverse, tol: dict, use_h=True):
    """``backend`` and the ``python`` reference loop: output, last ``c``, every gradient."""
    T, B = leaves[0].shape[:2]
    H = leaves[3].shape[1]
    weight = torch.randn(T, B, H, dtype=leaves[0].dtype)
    ours = run_layer(backend, cell, leaves, masks, reverse, weight, use_h)
    ref = run_layer("python", cell, leaves, masks, reverse, weight, use_h)
    assert len(ours) == len(ref)
    for a, b in zip(ours, ref, strict=True):
        if a is None or b is None:
            assert a is None and b is None
            continue
        # rounding grows with the values' size (an unbounded ReLU's gradients reach 10s)
        scale = max(1.0, b.abs().max().item())
        torch.testing.assert_close(a, b, atol=tol["atol"] * scale, rtol=tol["rtol"])


def layer_tol(case: BackendCase, dtype: torch.dtype, cell: str) -> dict:
    """Backend against the python loop, same dtype: rounding of two summation orders."""
    if dtype == F64:
        return dict(atol=1e-10, rtol=1e-10)
    gain = CELL_CASES[cell].f32_gain
    return dict(atol=case.f32_layer_tol[0] * gain, rtol=case.f32_layer_tol[1] * gain)


def module_tol(case: BackendCase, cell: str) -> float:
    """The module-level tolerance of ``case`` for ``cell``."""
    return case.tol * (CELL_CASES[cell].f32_gain if case.dtype != F64 else 1.0)
