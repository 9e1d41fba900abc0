#!/usr/bin/env python
"""Forward + backward speed of rnndrop.nn.LSTM / GRU / RNN per scheme, as a ratio to torch's
fused op.

Every round times each variant once (a few repetitions, median) and divides by the
nn.LSTM (nn.GRU) time of the same round, so machine drift cancels; the table reports the
median over rounds of the time and of the ratio. Training mode (masks sampled every call).

    python scripts/bench_rnn.py                          # LSTM and GRU, all configs and schemes
    python scripts/bench_rnn.py --cells gru --configs medium --rounds 15
    python scripts/bench_rnn.py --cells rnn              # the tanh Elman RNN (not by default)
    python scripts/bench_rnn.py --loop python            # the pure-PyTorch loop instead of C++
    python scripts/bench_rnn.py --python-row             # add a pure-PyTorch loop row per scheme
    python scripts/bench_rnn.py --device cuda --python-row   # on a GPU: ratios to cuDNN
    python scripts/bench_rnn.py --device cuda --graph-row --step-row  # triton's paths side by side
    python scripts/bench_rnn.py --subnormals keep        # IEEE subnormals on every path
    python scripts/bench_rnn.py --compile-row --configs small   # torch.compile(model) vs eager
    python scripts/bench_rnn.py --compile-row --inference --configs small  # eval, no_grad forward

The header names the machine: CPU, its vector extensions (AVX2, AVX-512, AMX), threads and
the subnormal setting, which decides long-sequence speed on Intel cores (rnndrop.runtime).
``--subnormals flush`` (the default, as in ``rnndrop fit``) flushes them on both sides of each
ratio; ``keep`` keeps them everywhere; ``default`` is the layers' own default (only the
compiled loop flushes, inside its calls).

On CUDA the ``triton`` loop backend runs a layer in one launch where its kernel fits (hidden
size <= 128) and per step otherwise; ``--step-row`` adds the step path where the one launch
would run, ``--graph-row`` the step path replayed from CUDA graphs (RNNDROP_CUDA_GRAPHS=1).

``--compile-row`` adds ``torch.compile(model)`` per scheme (its path column counts the graph
breaks, from ``torch._dynamo.explain``); compiling happens in the warm-up, outside the timed
rounds. ``--inference`` times an eval-mode forward under ``torch.no_grad`` instead of a
training forward + backward (eval mode compiles with no graph break; a loop layer is then
unrolled into the graph, so compile time grows with the sequence length: use short configs).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time

import torch

from rnndrop import runtime
from rnndrop.config import RecurrentDropout
from rnndrop.kernels import LayerInputs, LayerMasks, loop_backend, select_backend
from rnndrop.nn import GRU, LSTM, RNN, RNNBase
from rnndrop.nn.masks import needs_loop

CONFIGS = {  # input, hidden, layers, T, B
    "small": (200, 200, 2, 20, 20),
    "medium": (650, 650, 2, 35, 20),
    "large": (1500, 1500, 2, 35, 20),
    "long": (128, 128, 1, 500, 32),
    "long_b128": (128, 128, 1, 500, 128),
}
DEFAULT_CONFIGS = {"cpu": ["small", "medium", "long"], "cuda": list(CONFIGS)}

SCHEMES = {
    "none": RecurrentDropout.none(),
    "naive": RecurrentDropout.naive(0.5),
    "naive_recurrent": RecurrentDropout.naive_recurrent(0.5),
    "variational": RecurrentDropout.variational(0.5),
    "variational untied": RecurrentDropout.variational(0.5, tied=False),
    "variational per-batch": RecurrentDropout.variational(0.5).replace(batch="per_batch"),
    "zoneout": RecurrentDropout.zoneout(0.05, 0.5),  # the GRU: zoneout_hidden only
    "weight_drop": RecurrentDropout.weight_drop(0.5),
    "semeniuta": RecurrentDropout.semeniuta(0.25),
    "awd": RecurrentDropout.awd(),
    # learned rates: relaxed masks, drawn explicitly, with gradients back to the rates
    "variational concrete": RecurrentDropout.variational(0.5).replace(concrete=True),
}


CELLS = {"lstm": (LSTM, torch.nn.LSTM), "gru": (GRU, torch.nn.GRU), "rnn": (RNN, torch.nn.RNN)}
SUBNORMALS = {"flush": True, "keep": False, "default": None}  # rnndrop.set_flush_subnormals


def scheme_for(cell: str, name: str) -> RecurrentDropout | None:
    """The scheme as the cell reads it (zoneout on h alone without a cell state); None where
    it sets a site the cell lacks (the RNN has no gated candidate: semeniuta)."""
    cfg = SCHEMES[name].replace(embedding=0.0)  # awd's: a model's, not a layer's
    if cell != "lstm":
        cfg = cfg.replace(zoneout_cell=0.0)
    if cell == "rnn" and cfg.candidate > 0:
        return None
    return cfg


@contextlib.contextmanager
def environ(env: dict[str, str] | None):
    old = {k: os.environ.get(k) for k in env or {}}
    os.environ.update(env or {})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v


INFERENCE = False  # --inference: eval-mode forward under no_grad, not forward + backward


def time_fwd_bwd(model, x, reps: int, backend: str | None = None, env=None) -> float:
    times = []
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    with loop_backend(backend) if backend else contextlib.nullcontext(), environ(env):
        for _ in range(reps):
            sync()
            start = time.perf_counter()
            if INFERENCE:
                with torch.no_grad():
                    model(x)
            else:
                out, state = model(x)
                (out.sum() + (state[1] if isinstance(state, tuple) else state).sum()).backward()
            sync()
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def graph_breaks(model, x) -> int:
    """Graph breaks of ``torch.compile(model)`` on ``x`` (``torch._dynamo.explain``)."""
    torch._dynamo.reset()
    with torch.no_grad() if INFERENCE else contextlib.nullcontext():
        return torch._dynamo.explain(model)(x).graph_break_count


STEP = {"RNNDROP_TRITON_PATH": "step"}
GRAPHS = {"RNNDROP_TRITON_PATH": "step", "RNNDROP_CUDA_GRAPHS": "1"}


def bench(cell, config, schemes, rounds, reps, dtype, device, python_row, step_row=False,
          graph_row=False, compile_row=False) -> list[tuple]:  # fmt: skip
    I, H, L, T, B = CONFIGS[config]
    ours, theirs = CELLS[cell]
    torch.manual_seed(0)
    ref = theirs(I, H, L).to(device, dtype)
    ref.train(not INFERENCE)
    base_name = f"nn.{cell.upper()}"
    variants = {base_name: (ref, None, None)}
    x = torch.randn(T, B, I, dtype=dtype, device=device, requires_grad=not INFERENCE)
    breaks = {}
    for name in schemes:
        cfg = scheme_for(cell, name)
        if cfg is None:
            continue
        m = ours(I, H, L, dropout=cfg).to(device, dtype)
        m.load_state_dict(ref.state_dict(), strict=False)  # concrete: + its rate logits
        m.train(not INFERENCE)
        variants[name] = (m, None, None)
        if compile_row:
            compiled = torch.compile(m)
            breaks[f"{name} [torch.compile]"] = graph_breaks(m, x)
            variants[f"{name} [torch.compile]"] = (compiled, None, None)
        path = _path(m, device)
        if python_row and path not in ("fused", "fused (torch)"):
            variants[f"{name} [python loop]"] = (m, "python", None)
        if step_row and path == "loop (triton, one launch)":
            variants[f"{name} [triton step]"] = (m, "triton", STEP)
        if graph_row and path.startswith("loop (triton"):
            variants[f"{name} [triton step, CUDA graphs]"] = (m, "triton", GRAPHS)
    for m, backend, env in variants.values():  # warm up (build the kernels, capture graphs)
        time_fwd_bwd(m, x, 3, backend, env)
    ms = {n: [] for n in variants}
    ratios = {n: [] for n in variants}
    for _ in range(rounds):
        base = time_fwd_bwd(ref, x, reps)
        ms[base_name].append(base)
        ratios[base_name].append(1.0)
        for name, (m, backend, env) in variants.items():
            if name == base_name:
                continue
            t = time_fwd_bwd(m, x, reps, backend, env)
            ms[name].append(t)
            ratios[name].append(t / base)
    rows = []
    for n, (m, backend, env) in variants.items():
        path = "loop (python)" if backend == "python" else _path(m, device)
        if env is not None:
            path = "loop (triton, step)"
        if n in breaks:
            path = f"compiled, {breaks[n]} graph breaks"
        rows.append((cell, config, n, statistics.median(ms[n]) * 1e3,
                     statistics.median(ratios[n]), path))  # fmt: skip
    return rows


def _path(m, device: str) -> str:
    m = getattr(m, "_orig_mod", m)  # torch.compile's wrapper
    if not isinstance(m, RNNBase):
        return "fused (torch)"
    loop = any(needs_loop(m.dropout, layer, True, m.num_layers) for layer in range(m.num_layers))
    if not loop:
        return "fused"
    H = m.hidden_size
    x = torch.zeros(1, 1, m.cell.gates * H, device=device, dtype=m.weight_hh_l0.dtype)
    h = x.new_zeros(1, H)
    probe = LayerInputs(m.cell, x, None, None, m.weight_hh_l0, None, h, h, LayerMasks())
    backend = select_backend(probe)
    if backend.name == "triton":  # which of its two paths
        return f"loop (triton, {'step' if backend._steps(probe) else 'one launch'})"
    return f"loop ({backend.name})"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--cells", nargs="+", default=["lstm", "gru"], choices=list(CELLS))
    ap.add_argument("--configs", nargs="+", default=None, choices=list(CONFIGS),
                    help="default: small medium long on CPU, all on CUDA")  # fmt: skip
    ap.add_argument("--schemes", nargs="+", default=list(SCHEMES), choices=list(SCHEMES))
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--loop", choices=["auto", "python", "cpp", "triton"], default="auto")
    ap.add_argument("--python-row", action="store_true", help="add a pure-PyTorch loop row")
    ap.add_argument(
        "--step-row",
        action="store_true",
        help="CUDA: add triton's step path where its one-launch kernel runs",
    )
    ap.add_argument(
        "--graph-row",
        action="store_true",
        help="CUDA: add triton's step path replayed from CUDA graphs",
    )
    ap.add_argument(
        "--compile-row",
        action="store_true",
        help="add torch.compile(model) per scheme, with its graph breaks",
    )
    ap.add_argument(
        "--inference",
        action="store_true",
        help="time an eval-mode forward under no_grad (not fwd + bwd in training)",
    )
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--float64", action="store_true")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--subnormals", choices=list(SUBNORMALS), default="flush",
                    help="flush: on every path (rnndrop fit's default); keep: nowhere; "
                         "default: the layers' default (the C++ loop only)")  # fmt: skip
    args = ap.parse_args(argv)
    global INFERENCE
    INFERENCE = args.inference
    args.configs = args.configs or DEFAULT_CONFIGS["cuda" if args.device == "cuda" else "cpu"]
    os.environ["RNNDROP_LOOP"] = args.loop
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch.float64 if args.float64 else torch.float32
    runtime.set_flush_subnormals(SUBNORMALS[args.subnormals])
    mode = "eval forward, no_grad" if args.inference else "training forward + backward"
    print(f"# {runtime.describe_machine()} (--subnormals {args.subnormals}), {dtype}, "
          f"{torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'}; "
          f"rounds={args.rounds} reps={args.reps}; median over rounds; {mode}")  # fmt: skip
    timed = "forward ms" if args.inference else "fwd+bwd ms"
    print(f"| cell | config | scheme | path | {timed} | ratio to torch |")
    print("|---|---|---|---|---|---|")
    for cell in args.cells:
        for config in args.configs:
            rows = bench(cell, config, args.schemes, args.rounds, args.reps, dtype, args.device,
                         args.python_row, args.step_row, args.graph_row,
                         args.compile_row)  # fmt: skip
            for c, cfg, name, ms, ratio, path in rows:
                print(f"| {c} | {cfg} | {name} | {path} | {ms:.1f} | {ratio:.2f} |", flush=True)


if __name__ == "__main__":
    main()
