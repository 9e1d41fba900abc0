"""The ``triton`` loop backend: what only it has. Its parity with the other backends (every
cell and site on both paths, the LayerNorm LSTM on the step path, the input projection and
biases, edge shapes, partial gradients, whole modules and packed input) is
tests/test_parity.py's, in Triton's interpreter.

Runs on CPU with ``TRITON_INTERPRET=1``: the same kernels a GPU compiles, executed with numpy
one program after another (exact parity, blind to speed). The variable is set per test with
``monkeypatch``: ``@triton.jit`` reads it when it decorates a kernel, so the backend keeps its
kernels undecorated and wraps them per call from the variable's current value; nothing here
leaks into other test files. Here: what it refuses and why, ``auto``'s choices, the step
path beyond the one-launch kernel's hidden sizes, the CUDA-graph cache (capture faked on
CPU), every cell's kernels compiled for sm_90 without a GPU, half precision, and on a GPU
(skipped without one) the compiled kernels against the ``python`` loop.
"""

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (the 'triton' extra)")

from parity import assert_layer_agrees, layer_call, make_leaves, make_masks, run_layer

from rnndrop import kernels
from rnndrop.config import RecurrentDropout as RD
from rnndrop.kernels import LayerInputs, LayerMasks
from rnndrop.kernels.triton import KERNELS, MAX_H, TritonBackend, row_cell, triton_path
from rnndrop.nn import LSTM
from rnndrop.nn.cells import CELLS as ALL_CELLS
from rnndrop.nn.cells import GRU_CELL, LAYERNORM_LSTM_CELL, LSTM_CELL

TOL = dict(atol=1e-5, rtol=1e-5)
CELLS = {name: ALL_CELLS[name]
         for name in ("lstm", "gru", "rnn_tanh", "rnn_relu", "layernorm_lstm")}  # fmt: skip


def run(backend, cell, leaves, masks, reverse, weight):
    return run_layer(backend, cell, leaves, masks, reverse, weight)


def assert_agree(cell, leaves, masks, reverse):
    if row_cell(cell.name) and triton_path() == "loop":  # the step path runs it
        with pytest.raises(RuntimeError, match=f"one-launch kernel has no {cell.name} cell"):
            run_layer("triton", cell, leaves, masks, reverse, torch.ones(1))
        return
    assert_layer_agrees("triton", cell, leaves, masks, reverse, TOL)


@pytest.fixture(autouse=True)
def interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _inputs(cell, dtype=torch.float32, H=3, device="cpu"):
    x = torch.zeros(2, 1, cell.gates * H, dtype=dtype, device=device)
    h = torch.zeros(1, H, dtype=dtype, device=device)
    return LayerInputs(cell, x, None, None, torch.zeros(cell.gates * H, H, dtype=dtype), None,
                       h, h if cell.has_cell else None, LayerMasks())  # fmt: skip


def test_cpu_without_the_interpreter_says_how(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setenv("RNNDROP_LOOP", "triton")
    with pytest.raises(
        RuntimeError,
        match=r"runs on CUDA tensors; set TRITON_INTERPRET=1 to "
        r"run it on CPU in Triton's interpreter",
    ):
        LSTM(3, 4, dropout=RD.zoneout(0.1, 0.1))(torch.randn(2, 1, 3))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "TRITON_INTERPRET=1" in TritonBackend().unavailable(_inputs(GRU_CELL))


def test_what_it_refuses_it_names(monkeypatch):
    b = TritonBackend()
    for cell in CELLS.values():
        assert b.unavailable(_inputs(cell)) is None
        assert "float32, float16 and bfloat16 only" in b.unavailable(_inputs(cell, torch.float64))
        assert b.unavailable(_inputs(cell, torch.bfloat16)) is None  # the step path takes it
        assert b.unavailable(_inputs(cell, H=MAX_H + 1)) is None  # the step path takes it
        monkeypatch.setenv("RNNDROP_TRITON_PATH", "loop")
        if row_cell(cell.name):
            assert b.unavailable(_inputs(cell)) == (
                f"its one-launch kernel has no {cell.name} cell (its step path runs it)"
            )
        else:
            assert f"up to {MAX_H}" in b.unavailable(_inputs(cell, H=MAX_H + 1))
            assert "float32 only" in b.unavailable(_inputs(cell, torch.float16))
        monkeypatch.delenv("RNNDROP_TRITON_PATH")
    gru = _inputs(GRU_CELL)
    gru.masks.zoneout_c = torch.zeros(1, 1, 3)
    assert "no cell state" in b.unavailable(gru)
    empty = _inputs(LAYERNORM_LSTM_CELL)  # no fused op: an empty batch reaches the loop
    empty.x, empty.h0, empty.c0 = torch.zeros(2, 0, 12), torch.zeros(0, 3), torch.zeros(0, 3)
    assert b.unavailable(empty) == "the batch is empty"
    monkeypatch.setenv("RNNDROP_TRITON_PATH", "fused")
    with pytest.raises(ValueError, match=r"RNNDROP_TRITON_PATH='fused': choose one of"):
        b.unavailable(_inputs(LSTM_CELL))


def test_a_cell_without_kernels_is_named():
    """A cell with no entry in the backend's registry: refused first, by name."""
    from dataclasses import replace

    inp = _inputs(replace(LSTM_CELL, name="peephole_lstm"))
    assert TritonBackend().unavailable(inp) == (
        "it has no peephole_lstm kernel (python or cpp run this cell)"
    )
    from rnndrop.kernels.triton import _kernel

    with pytest.raises(KeyError, match=r"no triton kernel 'peephole_lstm_loop_fwd'"):
        _kernel("peephole_lstm_loop_fwd", True)


def test_a_cell_file_may_not_shadow_the_loops_helpers(monkeypatch):
    """A cell's functions share one namespace with the loops: a cell file defining one of
    their names (here ``tanh``) is refused, naming it, instead of silently replacing it."""
    import sys
    import types

    from rnndrop.kernels import triton as tb

    name = f"{tb.__name__}.cell_shadowing"
    module = types.ModuleType(name)
    exec("def tanh(x):\n    return x\n\n\ndef forward(*a):\n    pass\n", module.__dict__)
    monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setitem(tb.CELLS, "shadowing", ("cell_shadowing", "forward", "forward"))
    with pytest.raises(ValueError, match=r"cell_shadowing defines \['tanh'\].*rename them"):
        tb._kernel("shadowing_step_fwd", True)


def test_each_cell_kernel_applies_the_step_masks_of_its_sites():
    """A cell's kernels apply the step mask of every site the cell has (SITES), as the cell
    file's STEP_MASKS or the loops' own (zoneout), and of no site it lacks but the loops'
    zoneout on c (which ``unavailable`` refuses for a cell without c): a site given to a
    cell but left out of its STEP_MASKS would otherwise be dropped without a word."""
    from rnndrop.config import SITES
    from rnndrop.kernels.triton import _kernels, step_reads

    for name in CELLS:
        for field, read in zip(LayerMasks.step_names(), step_reads(name), strict=True):
            site = SITES[LayerMasks.site(field)]
            has = site.cells is None or name in site.cells
            assert read or not has, f"{name}'s kernels drop {field}"
            assert has or not read or field in _kernels.LOOP_MASKS, f"{name} reads {field}"


def test_a_cell_file_naming_no_step_field_is_refused(monkeypatch):
    from rnndrop.kernels import triton as tb
    from rnndrop.kernels.triton import cell_gru

    monkeypatch.setattr(cell_gru, "STEP_MASKS", ("candidate", "no_such_mask"))
    monkeypatch.setattr(tb, "_READS", {})
    with pytest.raises(ValueError, match=r"cell_gru.STEP_MASKS names \['no_such_mask'\], which "
                                         r"are not step fields of LayerMasks"):  # fmt: skip
        tb.step_reads("gru")


@pytest.mark.parametrize("path", ["loop", "step"])
def test_a_step_mask_the_cell_does_not_apply_is_ignored_and_gets_no_gradient(path, monkeypatch):
    """The GRU given the LSTM's cell mask (which its layers refuse): the adapter hands the
    kernels None for it, so the result is the GRU's without it, and the mask no gradient."""
    monkeypatch.setenv("RNNDROP_TRITON_PATH", path)
    cell = CELLS["gru"]
    T, B, I, H = 3, 2, 3, 4
    torch.manual_seed(0)
    leaves = make_leaves(cell, False, True, T, B, I, H)
    weight = torch.randn(T, B, H)
    masks = make_masks(cell, "everything_untied", T, B, I, H)
    ref = run("triton", cell, leaves, masks, False, weight)
    masks.cell = (torch.rand(T, B, H) < 0.5).float().requires_grad_()
    ours = run("triton", cell, leaves, masks, False, weight)
    for a, b in zip(ours, ref, strict=True):
        assert (a is None and b is None) or torch.equal(a, b)
    h_seq, _ = layer_call(cell, leaves, masks, False, "triton")
    assert torch.autograd.grad((h_seq * weight).sum(), masks.cell, allow_unused=True)[0] is None


@pytest.mark.parametrize("cell", list(CELLS))
def test_auto_runs_hidden_sizes_beyond_the_one_launch_kernel_per_step(cell, monkeypatch):
    """H > MAX_H: the step kernels run (and not the one-launch ones), matching python."""
    from rnndrop.kernels import triton as tb

    launched = []
    kernel = tb._kernel
    monkeypatch.setattr(tb, "_kernel", lambda name, i: launched.append(name) or kernel(name, i))
    cell = CELLS[cell]
    T, B, I, H = 2, 2, 3, MAX_H + 3
    masks = make_masks(cell, "everything_untied", T, B, I, H)
    assert_agree(cell, make_leaves(cell, False, True, T, B, I, H), masks, False)
    assert set(launched) == {f"{cell.name}_step_fwd", f"{cell.name}_step_bwd"}


def test_auto_never_picks_the_interpreter_over_cpp():
    from rnndrop.kernels.cpp import build

    if build.load() is None:
        pytest.skip("the compiled kernel is not available here")
    with kernels.loop_backend("auto"):
        assert kernels.select_backend(_inputs(LSTM_CELL)).name == "cpp"


def test_auto_never_picks_the_interpreter_even_without_cpp(monkeypatch):
    """With TRITON_INTERPRET=1 (set here) and no compiled kernel, auto falls to python."""
    monkeypatch.setattr(kernels.BACKENDS["cpp"], "unavailable", lambda inp: "disabled")
    with kernels.loop_backend("auto"):
        assert kernels.select_backend(_inputs(LSTM_CELL)).name == "python"
    with kernels.loop_backend("triton"):  # asked for explicitly, the interpreter runs
        assert kernels.select_backend(_inputs(LSTM_CELL)).name == "triton"


def _copy_into(dst, src):
    if isinstance(dst, torch.Tensor):
        dst.copy_(src)
    elif dst is not None:
        pairs = zip(dst.tensors() if hasattr(dst, "tensors") else dst,
                    src.tensors() if hasattr(src, "tensors") else src, strict=True)  # fmt: skip
        for d, s in pairs:
            _copy_into(d, s)


@pytest.mark.parametrize("cell", list(CELLS))
def test_step_path_graph_cache_replays_static_buffers(cell, monkeypatch):
    """The CUDA-graph cache of the step path, with the capture faked on CPU (a replay reruns
    the captured function on the static buffers and writes into the captured outputs, as a
    graph does): the first call runs eagerly, the second captures, later calls copy their
    inputs in, replay and clone out; new inputs and masks every call match the python loop,
    and nothing but the first call of a signature runs outside a replay."""
    from rnndrop.kernels import triton as tb

    captures, replays = [], []

    def fake_capture(fn, static):
        out = fn(*static)
        captures.append(1)

        def replay():
            replays.append(1)
            _copy_into(out, fn(*static))

        return replay, out

    monkeypatch.setenv("RNNDROP_TRITON_PATH", "step")
    monkeypatch.setattr(tb, "cuda_graphs", lambda t: True)
    monkeypatch.setattr(tb, "_GRAPHS", tb._GraphCache())
    monkeypatch.setattr(tb._GRAPHS, "_capture", fake_capture)
    cell = CELLS[cell]
    T, B, I, H = 3, 2, 3, 5
    for call in range(4):
        torch.manual_seed(call)
        masks = make_masks(cell, "everything_untied", T, B, I, H)
        assert_agree(cell, make_leaves(cell, False, True, T, B, I, H), masks, False)
    assert len(captures) == 2  # forward and backward, each captured once (second call)
    assert len(replays) == 2 * 3  # calls 2, 3 and 4 replay both


@pytest.mark.parametrize("kernel", [f"{c}_{k}" for c in CELLS for k in KERNELS
                                    if not (row_cell(c) and k.startswith("loop"))])  # fmt: skip
def test_kernels_compile_for_a_gpu_without_one(kernel, monkeypatch, tmp_path):
    """The compiled path, which the interpreter never takes: Triton's front end, its GPU
    passes and the bundled ptxas build each cell's instance of each kernel for sm_90 (every
    site on, untied masks) within the shared memory of a block, the backward kernels with
    the mask gradients of concrete dropout on (MG); a row cell's step kernels only. No GPU
    is needed to compile."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from rnndrop.kernels.triton import _SHARED_BYTES, NUM_STAGES, compile_spec

    pytest.importorskip("triton.backends.nvidia", reason="triton has no CUDA backend here")
    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))  # read when compiling
    cell = CELLS[next(c for c in CELLS if kernel.startswith(c + "_"))]
    # every site the kernel applies on: derived from LayerMasks' step fields and the cell's
    # STEP_MASKS (a new site's mask is compiled here without a line in this test)
    fn, sig, consts = compile_spec(cell, kernel[len(cell.name) + 1 :])
    try:
        compiled = triton.compile(
            ASTSource(fn, sig, consts),
            target=GPUTarget("cuda", 90, 32),
            options=dict(num_warps=4, num_stages=NUM_STAGES),
        )
    except FileNotFoundError as e:  # no ptxas
        pytest.skip(f"the CUDA toolchain of triton is incomplete here: {e}")
    assert compiled.metadata.shared <= _SHARED_BYTES[16]


# ---- on a GPU (skipped without one): the compiled kernels, not the interpreter ----------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("H", [5, 64, MAX_H])
@pytest.mark.parametrize("cell", list(CELLS))
def test_compiled_on_cuda_matches_python(cell, H, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    cell = CELLS[cell]
    T, B, I = 6, 19, 4
    for reverse in (False, True):
        for case in ("none", "everything_untied", "everything_tied"):
            torch.manual_seed(0)
            masks = make_masks(cell, case, T, B, I, H)
            leaves = make_leaves(cell, False, True, T, B, I, H)
            masks = LayerMasks(*[None if t is None else t.cuda() for t in masks.tensors()])
            leaves = [None if t is None else t.detach().cuda().requires_grad_() for t in leaves]
            assert_agree(cell, leaves, masks, reverse)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_auto_picks_triton_for_the_loop_path_on_cuda():
    for cell in CELLS.values():
        inp = _inputs(cell, device="cuda")
        inp.w_hh = inp.w_hh.cuda()
        with kernels.loop_backend("auto"):
            assert kernels.select_backend(inp).name == "triton"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("cell", list(CELLS))
def test_step_path_cuda_graphs_match_python(cell, monkeypatch):
    """RNNDROP_CUDA_GRAPHS=1: the first call runs eagerly, the second captures, the rest
    replay; every call, with new inputs and masks each time, matches the python loop."""
    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setenv("RNNDROP_TRITON_PATH", "step")
    monkeypatch.setenv("RNNDROP_CUDA_GRAPHS", "1")
    cell = CELLS[cell]
    T, B, I, H = 5, 7, 4, 200
    for call in range(4):
        torch.manual_seed(call)
        masks = make_masks(cell, "everything_untied", T, B, I, H)
        leaves = make_leaves(cell, False, True, T, B, I, H)
        masks = LayerMasks(*[None if t is None else t.cuda() for t in masks.tensors()])
        leaves = [None if t is None else t.detach().cuda().requires_grad_() for t in leaves]
        for reverse in (False, True):
            assert_agree(cell, leaves, masks, reverse)


@pytest.mark.parametrize("case", ["everything_untied", "cell_per_step"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("cell", list(CELLS))
def test_step_path_in_half_precision_is_as_exact_as_the_reference_loop(cell, dtype, case):
    """float16 / bfloat16 (what autocast hands the loop): the step kernels widen to float32
    and round once per store, so against the float32 layer they are at least about as exact
    as the python loop run in the same dtype (which rounds after every op).

    Every site but the cell mask, and the cell mask alone: with both the candidate and the
    cell mask on, a LayerNorm LSTM's c_t turns an ulp of h_{t-1} into several (bfloat16,
    this draw: one triton step from its own state is within an ulp of float32, yet its c_T
    is 4x further from float32 than python's), so one draw can favour either loop."""
    cell = CELLS[cell]
    if case == "cell_per_step" and not cell.has_cell:
        pytest.skip(f"{cell.name} has no cell state")
    T, B, I, H = 6, 3, 4, 20
    torch.manual_seed(0)
    masks = make_masks(cell, case, T, B, I, H)
    masks.cell = masks.cell if case == "cell_per_step" else None
    leaves = make_leaves(cell, False, True, T, B, I, H)
    weight = torch.randn(T, B, H)

    def cast(ts, dt):
        return [None if t is None else t.detach().to(dt).requires_grad_(t.requires_grad)
                for t in ts]  # fmt: skip

    for reverse in (False, True):
        ref = run("python", cell, leaves, masks, reverse, weight)
        half_masks = LayerMasks(*cast(masks.tensors(), dtype))
        ours = run("triton", cell, cast(leaves, dtype), half_masks, reverse, weight.to(dtype))
        theirs = run("python", cell, cast(leaves, dtype), half_masks, reverse, weight.to(dtype))
        for k, (a, b, want) in enumerate(zip(ours, theirs, ref, strict=True)):
            if want is None:
                continue
            assert a.dtype == dtype
            err = (a.float() - want).abs().max().item()
            ref_err = (b.float() - want).abs().max().item()
            scale = want.abs().max().item()
            eps = torch.finfo(dtype).eps
            assert err <= 1.5 * ref_err + 4 * eps * scale, (k, err, ref_err)
