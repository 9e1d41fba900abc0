"""Weight drop (DropConnect on W_hh) without deleting parameters or writing to .data."""

import copy

import pytest
import torch
from torch import nn

from rnndrop.config import RecurrentDropout as RD
from rnndrop.nn import LSTM


def make(p=0.5, **kw):
    ref = nn.LSTM(4, 6, 2, **kw)
    lstm = LSTM(4, 6, 2, dropout=RD.weight_drop(p), **kw)
    lstm.load_state_dict(ref.state_dict())
    return ref, lstm


def test_parameters_are_plain_and_intact():
    ref, lstm = make()
    assert [n for n, _ in lstm.named_parameters()] == [n for n, _ in ref.named_parameters()]
    before = {n: p.detach().clone() for n, p in lstm.named_parameters()}
    for _ in range(5):  # repeated forwards never accumulate zeros in the real weight
        lstm(torch.randn(3, 2, 4))[0].sum().backward()
    for n, p in lstm.named_parameters():
        assert torch.equal(p, before[n]) and (p != 0).all(), n


def test_gradient_reaches_the_real_weight_through_the_mask():
    _, lstm = make(0.5)
    lstm.record_masks = True
    out, _ = lstm(torch.randn(5, 3, 4))
    out.sum().backward()
    for layer in (0, 1):
        mask = lstm.last_masks[f"weight_hh/l{layer}"]
        grad = getattr(lstm, f"weight_hh_l{layer}").grad
        assert grad is not None
        assert (grad[mask == 0] == 0).all()  # dropped connections get no gradient
        assert (grad[mask != 0] != 0).float().mean() > 0.9


def test_new_mask_every_forward_and_full_weight_in_eval():
    ref, lstm = make(0.5)
    lstm.record_masks = True
    x = torch.randn(5, 3, 4)
    a = lstm(x)[0]
    m1 = lstm.last_masks["weight_hh/l0"]
    b = lstm(x)[0]
    assert not torch.equal(m1, lstm.last_masks["weight_hh/l0"]) and not torch.equal(a, b)
    lstm.eval()
    assert torch.equal(lstm(x)[0], ref(x)[0])


def test_survives_to_deepcopy_and_state_dict():
    ref, lstm = make(0.3)
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    twin = copy.deepcopy(lstm).double()
    twin.train()
    torch.manual_seed(1)
    y = twin(x)[0]
    y.sum().backward()
    assert twin.weight_hh_l1.grad is not None and twin.weight_hh_l1.dtype == torch.float64
    fresh = LSTM(4, 6, 2, dropout=RD.weight_drop(0.3)).double()
    fresh.load_state_dict(twin.state_dict())
    torch.manual_seed(1)
    assert torch.equal(fresh(x)[0], y)
    fresh.eval()
    assert torch.equal(fresh(x)[0], ref.double()(x)[0])


@pytest.mark.slow
def test_torch_compile():
    _, lstm = make(0.4)
    compiled = torch.compile(lstm)
    x = torch.randn(5, 3, 4)
    lstm.record_masks = True
    torch.manual_seed(2)
    out, (_, c) = compiled(x)
    (out.sum() + c.sum()).backward()
    g = lstm.weight_hh_l0.grad.clone()
    lstm.zero_grad()
    torch.manual_seed(2)
    out2, (_, c2) = lstm(x)
    (out2.sum() + c2.sum()).backward()
    torch.testing.assert_close(out, out2)
    torch.testing.assert_close(lstm.weight_hh_l0.grad, g)
    compiled.eval()
    assert torch.equal(compiled(x)[0], lstm(x)[0])
