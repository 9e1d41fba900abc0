"""CUDA: fused path against cuDNN's nn.LSTM, loop path against the CPU (same masks)."""

import warnings

import pytest
import torch
from torch import nn

from rnndrop.config import RecurrentDropout as RD
from rnndrop.nn import LSTM

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
