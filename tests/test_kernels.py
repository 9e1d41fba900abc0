"""The engine's contract with its loop backends: selection, errors, edge shapes, the build cache."""

import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from rnndrop import kernels
from rnndrop.config import RecurrentDropout as RD
from rnndrop.kernels.cpp import build
from rnndrop.nn import GRU, LSTM

LOOP = RD(recurrent=0.3, candidate=0.2, zoneout_hidden=0.1)  # a loop-path scheme for both cells


@pytest.mark.parametrize("cls,ref", [(LSTM, nn.LSTM), (GRU, nn.GRU)])
@pytest.mark.parametrize("backend", ["python", "cpp"])
def test_empty_batch_returns_empty_output_like_torch(cls, ref, backend):
    if backend == "cpp" and build.load() is None:
        pytest.skip("the compiled kernel is not available here")
    m = cls(4, 8, 2, dropout=LOOP).train()
    x = torch.randn(5, 0, 4)
    with kernels.loop_backend(backend):
        out, state = m(x)
    want_out, want_state = ref(4, 8, 2)(x)
    assert out.shape == want_out.shape == (5, 0, 8)
    for a, b in zip(
        state if isinstance(state, tuple) else (state,),
        want_state if isinstance(want_state, tuple) else (want_state,),
        strict=True,
    ):
        assert a.shape == b.shape


@pytest.mark.parametrize("cls", [LSTM, GRU])
@pytest.mark.parametrize("dropout", [None, LOOP])
def test_zero_steps_gives_torchs_message(cls, dropout):
    m = cls(4, 8, dropout=dropout)
    with pytest.raises(RuntimeError, match="Expected sequence length to be larger than 0"):
        m(torch.randn(0, 3, 4))


@pytest.mark.parametrize("cls", [LSTM, GRU])
def test_torchs_own_default_dropout_warns_nothing(cls):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = cls(4, 8, dropout=0.0)
    assert not m.dropout.any


@pytest.mark.parametrize("cls", [LSTM, GRU])
def test_last_masks_hold_exactly_the_last_forwards_masks(cls):
    m = cls(4, 8, dropout=LOOP)
    m.record_masks = True
    x = torch.randn(5, 2, 4)
    m.train()(x)
    assert "recurrent/l0" in m.last_masks
    m.eval()(x)  # draws no mask
    assert m.last_masks == {}
    m.train()(x)
    assert "recurrent/l0" in m.last_masks


def test_programmatic_choice_wins_over_the_environment(monkeypatch):
    monkeypatch.setenv("RNNDROP_LOOP", "triton")
    assert kernels.get_loop_backend() == "triton"
    with kernels.loop_backend("python"):
        assert kernels.get_loop_backend() == "python"
        with kernels.loop_backend("auto"):
            assert kernels.get_loop_backend() == "auto"
        assert kernels.get_loop_backend() == "python"
    kernels.set_loop_backend("python")
    try:
        assert kernels.get_loop_backend() == "python"
    finally:
        kernels.set_loop_backend(None)
    assert kernels.get_loop_backend() == "triton"
    with pytest.raises(ValueError, match="choose one of"):
        kernels.set_loop_backend("gpu")


@pytest.mark.parametrize("cls", [LSTM, GRU])
def test_explicit_backend_that_cannot_run_never_falls_back(cls, monkeypatch):
    monkeypatch.setenv("RNNDROP_LOOP", "cpp")
    m = cls(4, 8, dropout=LOOP).to(torch.bfloat16)
    with pytest.raises(RuntimeError, match=r"'cpp' loop backend .* float32 and float64"):
        m(torch.randn(5, 2, 4, dtype=torch.bfloat16))
    monkeypatch.setenv("RNNDROP_LOOP", "auto")  # auto runs it on the python loop
    out, _ = m(torch.randn(5, 2, 4, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16


def test_auto_picks_the_compiled_loop_on_cpu_when_it_is_built():
    if build.load() is None:
        pytest.skip("the compiled kernel is not available here")
    from rnndrop.nn.cells import GRU_CELL, LSTM_CELL

    for cell in (LSTM_CELL, GRU_CELL):
        x = torch.zeros(2, 1, cell.gates * 3)
        h = torch.zeros(1, 3)
        inp = kernels.LayerInputs(
            cell,
            x,
            None,
            None,
            torch.zeros(cell.gates * 3, 3),
            None,
            h,
            h if cell.has_cell else None,
            kernels.LayerMasks(),
        )
        with kernels.loop_backend("auto"):
            assert kernels.select_backend(inp).name == "cpp"


# ---- the build cache -------------------------------------------------------------------


def test_cache_key_names_the_torch_installation(monkeypatch, tmp_path):
    flags = build._flags()
    here = build._name(flags)
    assert build._name(flags) == here  # stable
    fake = tmp_path / "other-venv" / "torch" / "__init__.py"
    fake.parent.mkdir(parents=True)
    fake.write_text("")
    monkeypatch.setattr(torch, "__file__", str(fake))
    assert build._name(flags) != here  # same version, another installation: its own build


def test_a_cached_build_is_imported_without_rebuilding(monkeypatch, capsys):
    if build.load() is None:
        pytest.skip("the compiled kernel is not available here")
    from torch.utils import cpp_extension

    def no_rebuild(*a, **k):
        raise AssertionError("cpp_extension.load called for a cached build")

    monkeypatch.setattr(cpp_extension, "load", no_rebuild)
    monkeypatch.setattr(build, "_state", {})
    module = build.load()
    assert module is not None and hasattr(module, "lstm_forward")
    assert "compiling" not in capsys.readouterr().err


def test_every_build_is_announced(monkeypatch, tmp_path, capsys):
    from torch.utils import cpp_extension

    calls = []

    def fake_load(name, sources, extra_cflags, build_directory, verbose):
        calls.append(name)
        return "module"

    monkeypatch.setattr(cpp_extension, "load", fake_load)
    monkeypatch.setattr(cpp_extension, "_get_build_directory", lambda name, verbose: str(tmp_path))
    monkeypatch.setattr(build, "_state", {})
    monkeypatch.delenv("RNNDROP_EXTENSION", raising=False)
    if build.shutil.which("c++") is None:
        pytest.skip("no C++ compiler here")
    assert build.load() == "module"
    err = capsys.readouterr().err
    assert len(calls) == 1 and "compiling the loop kernel" in err and "built in" in err
    assert Path(tmp_path).exists()


@pytest.mark.parametrize("cls", [LSTM, GRU])
def test_autocast_runs_the_loop_in_autocasts_dtype(cls):
    """Under autocast the loop computes in the dtype torch's fused op of the cell does; in
    autocast's dtype (the LSTM on CPU, every cell on CUDA) the
    layer equals the same layer run on bfloat16 copies of every tensor (the same masks), and
    float32 parameters still get float32 gradients close to the float32 layer's."""
    from rnndrop.kernels import LayerMasks, rnn_layer

    torch.manual_seed(0)
    cell = cls(3, 5).cell
    T, B, I, H, G = 4, 3, 3, 5, cell.gates
    b_h = torch.randn(G * H) * 0.5 if cell.split_recurrent else None
    c0 = torch.randn(B, H) if cell.has_cell else None
    leaves = [torch.randn(T, B, I), torch.randn(G * H, I) * 0.5, torch.randn(G * H) * 0.5,
              torch.randn(G * H, H) * 0.5, b_h, torch.randn(B, H), c0]  # fmt: skip
    leaves = [None if t is None else t.requires_grad_() for t in leaves]
    masks = LayerMasks(recurrent=(torch.rand(1, 1, B, H) > 0.3) / 0.7,
                       zoneout_h=(torch.rand(T, B, H) < 0.2).float())  # fmt: skip
    present = [t for t in leaves if t is not None]

    def run(tensors, masks):
        h, _ = rnn_layer(cell, *tensors, masks=masks, backend="python")
        return h, torch.autograd.grad(h.float().square().sum(), present)

    torch_rnn = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[cell.name](I, H)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h, grads = run(leaves, masks)
        torch_dtype = torch_rnn(leaves[0])[0].dtype
    # torch's own choice per op (CPU autocast: the LSTM in bfloat16, the GRU in float32)
    assert h.dtype == torch_dtype
    assert all(g.dtype == torch.float32 for g in grads)
    if torch_dtype == torch.float32:
        h32, _ = run(leaves, masks)
        assert torch.equal(h, h32)
        return
    bf = [None if t is None else t.to(torch.bfloat16) for t in leaves]
    want, _ = run(bf, LayerMasks(*[None if m is None else m.to(torch.bfloat16)
                                   for m in masks.tensors()]))  # fmt: skip
    assert torch.equal(h, want)
    h32, grads32 = run(leaves, masks)
    assert h32.dtype == torch.float32
    torch.testing.assert_close(h.float(), h32, atol=0.05, rtol=0.05)  # bfloat16: 8 bits
    for g, g32 in zip(grads, grads32, strict=True):
        torch.testing.assert_close(g, g32, atol=0.1 * g32.abs().max().item(), rtol=0.1)


@pytest.mark.parametrize("cls", [LSTM, GRU])
def test_scratch_kept_between_calls_never_leaks_into_results(cls):
    """The compiled loop keeps its untied-mask scratch between calls (loop.cpp `scratch`): a
    second, differently sized call must not change what the first returned, and each call must
    equal the python loop (concrete rates: the input masks' gradient leaves through dgx)."""
    if build.why_unavailable() is not None:
        pytest.skip(build.why_unavailable())
    spec = RD.variational(0.3, tied=False, concrete=True)

    def run(backend, T, B, seed):
        kernels.set_loop_backend(backend)
        try:
            torch.manual_seed(0)
            m = cls(5, 6, dropout=spec).double()
            x = torch.randn(T, B, 5, dtype=torch.double, requires_grad=True)
            torch.manual_seed(seed)
            out, _ = m(x)
            out.pow(2).sum().backward()
            return [out.detach(), x.grad] + [p.grad.clone() for p in m.parameters()]
        finally:
            kernels.set_loop_backend(None)

    first = run("cpp", 7, 3, 1)
    kept = [t.clone() for t in first]
    run("cpp", 4, 9, 2)  # other sizes reuse (and overwrite) the same scratch
    run("cpp", 1, 1, 3)
    for a, b in zip(first, kept, strict=True):
        assert torch.equal(a, b)
    for a, b in zip(first, run("python", 7, 3, 1), strict=True):
        torch.testing.assert_close(a, b)
