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
    # eval mode compiles with no graph break: the whole stack as plain ops (the reference
    # loop) that inductor fuses, so equal to rounding, not bit for bit
    torch.testing.assert_close(compiled(x)[0], lstm(x)[0], atol=1e-6, rtol=1e-6)
    with torch.no_grad():  # no gradients: the fused op itself, in the graph
        assert torch.equal(compiled(x)[0], lstm(x)[0])


# ---- the pooled CPU path (rnndrop.nn.workspace) -------------------------------------------


def _run(lstm, xs, seed):
    torch.manual_seed(seed)
    lstm.zero_grad()
    outs = [lstm(x)[0] for x in xs]  # every forward before any backward
    sum(o.sum() for o in outs).backward()
    return [o.detach() for o in outs], [p.grad.clone() for p in lstm.parameters()]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "scheme",
    [
        RD.weight_drop(0.5),
        RD.variational(0.3, tied=False).replace(batch="per_batch", weight_hh=0.4),
        RD.weight_drop(0.3).replace(scaling="classic"),
    ],
    ids=["weight_drop", "folded+weight_drop", "classic"],
)
def test_pooled_weights_equal_plain_ops(scheme, dtype):
    """Reused storage and seed-rebuilt masks give bitwise what plain autograd ops give,
    also with two forwards alive before one backward (each must keep its own W_hh)."""
    lstm = LSTM(4, 6, 2, dropout=scheme, dtype=dtype)
    plain = copy.deepcopy(lstm)
    plain.__dict__["_workspace"] = None  # masked_weight falls back to w * mask
    xs = [torch.randn(5, 3, 4, dtype=dtype) for _ in range(2)]
    for seed in (0, 1):  # the second round reuses the first round's storage
        out_a, grads_a = _run(lstm, xs, seed)
        out_b, grads_b = _run(plain, xs, seed)
        assert not torch.equal(out_a[0], out_a[1])
        for a, b in zip(out_a + grads_a, out_b + grads_b, strict=True):
            assert torch.equal(a, b)


def test_buffers_reuse_storage_only_when_free():
    from rnndrop.nn.workspace import WeightBuffers, _use_count

    if _use_count is None:
        pytest.skip("this torch has no storage use count: the pool is off")
    pool, w = WeightBuffers(), torch.randn(8, 3)
    a = pool.empty_like(("hh", 0, 0), w)
    b = pool.empty_like(("hh", 0, 0), w)
    assert a.data_ptr() != b.data_ptr() and a.shape == w.shape and a.is_contiguous()
    ptr = a.data_ptr()
    saved = a.view(-1)  # a view keeps the storage alive
    del a
    assert pool.empty_like(("hh", 0, 0), w).data_ptr() != ptr
    del saved
    assert pool.empty_like(("hh", 0, 0), w).data_ptr() == ptr
    assert pool.empty_like(("hh", 0, 0), w.double()).dtype == torch.float64
    held = [pool.empty_like(("ih", 0, 0), w) for _ in range(pool.max_per_key + 2)]
    assert len({t.data_ptr() for t in held}) == len(held)  # past the cap: fresh tensors


def test_masked_weight_gradcheck():
    from rnndrop.nn.workspace import WeightBuffers, masked_weight

    w = torch.randn(8, 3, dtype=torch.float64, requires_grad=True)
    fold = (torch.rand(4, 1, 3, dtype=torch.float64) > 0.5).double() * 2
    pool = WeightBuffers()

    def f(w):
        return masked_weight(w, p=0.5, seed=123, fold=fold, buffers=pool, key=("hh", 0, 0))

    assert torch.autograd.gradcheck(f, (w,))


def test_copies_start_with_an_empty_pool():
    import pickle

    _, lstm = make(0.5)
    lstm(torch.randn(3, 2, 4))[0].sum().backward()
    assert copy.deepcopy(lstm)._workspace._slots == {}
    twin = pickle.loads(pickle.dumps(lstm))
    assert twin._workspace._slots == {}
    torch.manual_seed(0)
    a = twin(torch.ones(3, 2, 4))[0]
    torch.manual_seed(0)
    assert torch.equal(a, lstm(torch.ones(3, 2, 4))[0])


def test_torch_func_grad_through_weight_drop():
    """Under torch.func transforms the plain ops run: grad of a functional call works and
    matches autograd on the module with the same seed."""
    from torch.func import functional_call, grad

    _, lstm = make(0.5)
    x = torch.randn(5, 3, 4)
    params = {k: v.detach() for k, v in lstm.named_parameters()}
    torch.manual_seed(3)
    g = grad(lambda p: functional_call(lstm, p, (x,))[0].sum())(params)
    torch.manual_seed(3)
    lstm(x)[0].sum().backward()
    for name, p in lstm.named_parameters():
        torch.testing.assert_close(g[name], p.grad)
