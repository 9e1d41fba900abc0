#!/usr/bin/env python
"""Compile time of the ``triton`` loop backend's kernels for a GPU, measured without one.

Triton's whole pipeline runs on the CPU; only loading the cubin needs a GPU. Each kernel is
compiled for sm_90 (``GPUTarget("cuda", 90, 32)``, num_warps 4, num_stages as the backend
launches it) with every site on (untied recurrent masks, candidate, zoneout on h and c,
the mask gradients of concrete dropout, the output's gradient), the same variant
tests/test_triton.py compiles, into an empty cache each time (nothing is reused between
repetitions). Stages, from Triton's compile listener (``knobs.compilation.listener``):

    ast     Python AST -> Triton IR (the front end: make_ir)
    ttir    Triton IR passes (inlining, combine, canonicalize)
    ttgir   Triton GPU IR (layouts, pipelining, shared memory)
    llir    LLVM IR
    ptx     PTX (LLVM's NVPTX back end)
    cubin   cubin (the ptxas bundled with triton)

The table gives, per kernel, the least over ``--reps`` (the run least disturbed by other
load, as ``timeit`` advises) of each stage's wall time and of the CPU time of the whole
compilation (this process and ptxas, in steps of 10 ms; less sensitive to other load than
wall time), in milliseconds, and the sums over all kernels and over the LSTM's and GRU's.
A first compilation, not counted, warms up. Before/after a change of the kernels' layout:
run it with ``PYTHONPATH`` at each checkout; it compiles whichever layout it finds: the
per-cell kernels (``lstm_fwd``, ..., before issue 21) or the template
(``rnndrop.kernels.triton.KERNELS`` per cell of ``CELLS``, after), with each step mask its
own argument or (``rnndrop.kernels.triton.compile_spec``) the step masks as one group.

    python scripts/triton_compile_time.py                 # every kernel, 5 repetitions
    python scripts/triton_compile_time.py --reps 5 --only lstm
    python scripts/triton_compile_time.py --json times.json
    python scripts/triton_compile_time.py --reps 1 --ptx ptx/   # each kernel's PTX, to diff
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import tempfile

STAGES = ("ast", "ttir", "ttgir", "llir", "ptx", "cubin")
FLAG_PREFIXES = ("HAS_", "MG")


def kernel_specs():
    """``[(label, JITFunction, signature, constants)]`` for every kernel of the layout
    found."""
    from triton.runtime.jit import JITFunction

    from rnndrop.kernels import triton as tb
    from rnndrop.kernels.triton import _kernels

    if hasattr(_kernels, "lstm_fwd"):  # per-cell kernels (before issue 21)
        names = [f"{c}_{k}" for c in ("lstm", "gru")
                 for k in ("fwd", "bwd", "step_fwd", "step_bwd")]  # fmt: skip
        gates = {"lstm": 4, "gru": 3}
        specs = []
        for name in names:
            fn = JITFunction(getattr(_kernels, name))
            lstm = name.startswith("lstm")
            consts = constants(fn, gates[name.split("_")[0]], lstm, not lstm)
            specs.append((name, fn, signature(fn, consts), consts))
        return specs
    from rnndrop.nn.cells import CELLS

    specs = []
    for cell_name in tb.CELLS:
        cell = CELLS[cell_name]
        rows = tb.row_cell(cell_name)
        for kind in tb.KERNELS:
            if rows and kind.startswith("loop"):  # a row cell has step kernels only
                continue
            name = f"{cell_name}_{kind}"
            if hasattr(tb, "compile_spec"):  # the step masks as one group (tuples)
                specs.append((name, *tb.compile_spec(cell, kind)))
                continue
            fn = tb._kernel(name, False)  # each step mask its own argument (before)
            consts = constants(fn, cell.gates, cell.has_cell, cell.split_recurrent, rows)
            consts.update(tb.cell_constants(cell))
            specs.append((name, fn, signature(fn, consts), consts))
    return specs


def constants(fn, gates: int, has_cell: bool, split: bool, rows: bool = False) -> dict:
    """For a layout without ``compile_spec`` (each step mask its own argument): every flag
    on (zoneout on c where the cell has c, b_h where it splits the recurrent product, as the
    adapter passes them), untied masks, reverse, a row cell's layout."""
    from rnndrop.kernels.triton import STEP_BLOCK

    consts = {}
    for name in inspect.signature(fn.fn).parameters:
        if name.startswith(FLAG_PREFIXES):
            consts[name] = {"HAS_ZC": has_cell, "MG_ZC": has_cell, "HAS_BH": split}.get(name, True)
        elif name in ("GR", "REVERSE", "BB", "BH", "BLOCK", "ROWS"):
            consts[name] = {"GR": gates, "REVERSE": True, "BB": 16, "BH": 16,
                            "BLOCK": STEP_BLOCK, "ROWS": rows}[name]  # fmt: skip
    return consts


def signature(fn, consts: dict) -> dict:
    """Pointers (upper-case names) ``*fp32``, sizes and strides ``i32``, constexprs."""
    sig = {}
    for name in inspect.signature(fn.fn).parameters:
        if name in consts:
            sig[name] = "constexpr"
        elif not name.isupper() or name in ("T", "B", "H", "N"):
            sig[name] = "i32"
        else:
            sig[name] = "*fp32"
    return sig


def _cpu() -> float:
    """CPU seconds of this process and its finished children (ptxas): unlike the stages'
    wall time, not inflated by other processes on a busy machine."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def compile_once(fn, sig: dict, consts: dict) -> dict:
    """Stage -> milliseconds of one compilation into an empty cache."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from rnndrop.kernels.triton import NUM_STAGES

    times = {}

    def listener(*, times_out=times, **kw):
        t = kw["times"]
        times_out["ast"] = t.ir_initialization / 1e3
        for stage, us in t.lowering_stages:
            times_out[stage] = us / 1e3

    fn.hash = None  # recompute dependencies (the cache key) as a first compile does
    t0 = _cpu()
    with tempfile.TemporaryDirectory() as cache:
        os.environ["TRITON_CACHE_DIR"] = cache
        old = knobs.compilation.listener, knobs.compilation.always_compile
        knobs.compilation.listener, knobs.compilation.always_compile = listener, True
        try:
            out = triton.compile(
                ASTSource(fn, sig, consts),
                target=GPUTarget("cuda", 90, 32),
                options=dict(num_warps=4, num_stages=NUM_STAGES),
            )
        finally:
            knobs.compilation.listener, knobs.compilation.always_compile = old
    times["cpu"] = (_cpu() - t0) * 1e3
    times["shared_bytes"] = out.metadata.shared
    times["ptx_lines"] = out.asm["ptx"].count("\n")
    times["_ptx"] = out.asm["ptx"]
    return times


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reps", type=int, default=5, help="compilations per kernel (the least)")
    p.add_argument("--only", default="", help="kernels whose name contains this")
    p.add_argument("--json", default="", help="also write the table here")
    p.add_argument("--ptx", default="", help="also write each kernel's PTX into this folder")
    a = p.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)  # the compiler, not the interpreter
    import triton

    specs = [s for s in kernel_specs() if a.only in s[0]]
    compile_once(*specs[0][1:])  # warm-up: imports and LLVM's one-time set-up, not counted
    rows = {}
    for name, *spec in specs:
        runs = [compile_once(*spec) for _ in range(a.reps)]
        rows[name] = {k: min(r[k] for r in runs) for k in runs[0] if not k.startswith("_")}
        if a.ptx:
            os.makedirs(a.ptx, exist_ok=True)
            with open(os.path.join(a.ptx, f"{name}.ptx"), "w") as f:
                f.write(runs[0]["_ptx"])
    head = f"{'kernel':<20}" + "".join(f"{s:>8}" for s in STAGES)
    print(f"triton {triton.__version__}, sm_90, least of {a.reps}, ms; shared memory "
          f"(bytes) and PTX lines of the compiled kernel")  # fmt: skip
    print(head + f"{'total':>9}{'cpu':>7}{'shared':>8}{'ptx':>7}")
    for name, r in rows.items():
        r["total"] = sum(r.get(s, 0.0) for s in STAGES)
        print(f"{name:<20}" + "".join(f"{r.get(s, 0.0):8.0f}" for s in STAGES)
              + f"{r['total']:9.0f}{r['cpu']:7.0f}{r['shared_bytes']:8.0f}"
              f"{r['ptx_lines']:7.0f}")  # fmt: skip
    for label, keep in (("sum", ""), ("sum lstm, gru", "lstm gru")):
        part = [r for n, r in rows.items() if not keep or n.split("_")[0] in keep.split()]
        tot = {s: sum(r.get(s, 0.0) for r in part) for s in (*STAGES, "total", "cpu")}
        print(f"{label:<20}" + "".join(f"{tot[s]:8.0f}" for s in STAGES)
              + f"{tot['total']:9.0f}{tot['cpu']:7.0f}")  # fmt: skip
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
