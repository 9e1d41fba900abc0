"""CUDA: fused path against cuDNN's nn.LSTM, loop path against the CPU (same masks)."""

import contextlib
import warnings

import pytest
import torch
from torch import nn

from rnndrop import kernels
from rnndrop.config import RecurrentDropout as RD
from rnndrop.nn import GRU, LSTM, RNN

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

SCHEMES = [
    RD.variational(0.3),
    RD.variational(0.3, tied=False),
    RD.zoneout(0.1, 0.3),
    RD.semeniuta(0.3),
    RD.awd(),
    RD.naive_recurrent(0.3),
    RD.weight_drop(0.4),
]


@pytest.mark.parametrize("bidir", [False, True])
def test_plain_path_matches_cudnn(bidir):
    ref = nn.LSTM(8, 16, 2, bidirectional=bidir).cuda()
    ours = LSTM(8, 16, 2, bidirectional=bidir).cuda()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(7, 3, 8, device="cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "weights not contiguous" warning leaks out
        a, b = ref(x), ours(x)
    torch.testing.assert_close(b[0], a[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(b[1][1], a[1][1], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("cfg", SCHEMES, ids=lambda c: c.describe())
def test_training_on_cuda_matches_cpu_with_the_same_masks(cfg):
    cpu = LSTM(8, 16, 2, bidirectional=True, dropout=cfg).double()
    gpu = LSTM(8, 16, 2, bidirectional=True, dropout=cfg).double().cuda()
    gpu.load_state_dict(cpu.state_dict())
    x = torch.randn(9, 4, 8, dtype=torch.float64)
    outs = []
    for model, xx in ((cpu, x), (gpu, x.cuda())):
        xx = xx.clone().requires_grad_()
        torch.manual_seed(3)  # masks depend only on the seed, not on the device
        out, (h, c) = model(xx)
        grads = torch.autograd.grad(out.square().sum() + c.sum(), [xx, *model.parameters()])
        outs.append([t.cpu() for t in (out, h, c, *grads)])
    for a, b in zip(*outs, strict=True):
        torch.testing.assert_close(b, a, atol=1e-9, rtol=1e-9)


def test_eval_and_mc_on_cuda():
    from rnndrop.nn import mc_dropout

    lstm = LSTM(8, 16, dropout=RD.zoneout(0.1, 0.2)).cuda().eval()
    x = torch.randn(5, 2, 8, device="cuda")
    assert torch.equal(lstm(x)[0], lstm(x)[0])
    with mc_dropout(lstm):
        assert not torch.equal(lstm(x)[0], lstm(x)[0])


# ---- the triton backend on a GPU (its parity in the interpreter: tests/test_parity.py) ----

CELL_PAIRS = [(LSTM, nn.LSTM), (GRU, nn.GRU), (RNN, nn.RNN)]
LOOP_SCHEME = RD(recurrent=0.3, candidate=0.2, zoneout_hidden=0.1, tied=False, time="per_step")


def _run(model, x, loop=None, env=None, monkeypatch=None):
    for k, v in (env or {}).items():
        monkeypatch.setenv(k, v)
    x = x.clone().requires_grad_()
    with kernels.loop_backend(loop) if loop else contextlib.nullcontext():
        torch.manual_seed(3)
        out, state = model(x)
    states = state if isinstance(state, tuple) else (state,)
    grads = torch.autograd.grad(out.square().sum() + sum(s.sum() for s in states),
                                [x, *model.parameters()])  # fmt: skip
    for k in env or {}:
        monkeypatch.delenv(k)
    return [out, *states, *grads]


@pytest.mark.parametrize("path", ["loop", "step", "graphs"])
@pytest.mark.parametrize("H", [64, 200])
@pytest.mark.parametrize("cls,ref", CELL_PAIRS)
def test_triton_without_dropout_matches_cudnn(cls, ref, H, path, monkeypatch):
    """The loop forced (force_loop) on triton at no dropout against cuDNN, TF32 off."""
    if path == "loop" and H > 128:
        pytest.skip("the one-launch kernel holds H <= 128")
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    theirs = ref(8, H, 2, bidirectional=True).cuda()
    ours = cls(8, H, 2, bidirectional=True).cuda()
    ours.load_state_dict(theirs.state_dict())
    ours.force_loop = True
    env = {"RNNDROP_TRITON_PATH": "step" if path == "graphs" else path}
    if path == "graphs":
        env["RNNDROP_CUDA_GRAPHS"] = "1"
    x = torch.randn(9, 5, 8, device="cuda")
    want = _run(theirs, x)
    for _ in range(3 if path == "graphs" else 1):  # eager, capture, replay
        got = _run(ours, x, "triton", env, monkeypatch)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-4)


@pytest.mark.parametrize("H", [64, 200])
@pytest.mark.parametrize("cls", [LSTM, GRU])
def test_triton_with_masks_matches_the_python_loop_on_cuda(cls, H, monkeypatch):
    """Both paths against the PyTorch loop (the GEMMs follow torch's TF32 setting, off by
    default, in both)."""
    m = cls(8, H, 2, bidirectional=True, dropout=LOOP_SCHEME).cuda().train()
    x = torch.randn(9, 5, 8, device="cuda")
    want = _run(m, x, "python")
    for env in ({}, {"RNNDROP_TRITON_PATH": "step"}):
        got = _run(m, x, "triton", env, monkeypatch)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cls", [LSTM, GRU])
def test_triton_under_autocast_trains(cls, dtype):
    """Autocast: the step path runs the loop in autocast's dtype; float32 gradients, close
    to the float32 layer's at half precision's tolerance."""
    m = cls(8, 200, 2, dropout=LOOP_SCHEME).cuda().train()
    x = torch.randn(9, 5, 8, device="cuda")
    with torch.autocast("cuda", dtype=dtype):
        got = _run(m, x, "triton")
    want = _run(m, x, "python")
    assert got[1].dtype == dtype
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a.float(), b, atol=0.05 * b.abs().max().item(), rtol=0.05)
