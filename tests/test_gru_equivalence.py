"""rnndrop.nn.GRU with no dropout is nn.GRU: same parameters, same outputs, same gradients."""

import itertools

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from rnndrop.functional import keep_probability
from rnndrop.nn import GRU

GRID = list(itertools.product([1, 2], [False, True], [False, True], [False, True]))


def make_pair(layers, bidir, batch_first, dtype=torch.float32, bias=True, I=5, H=7):
    ref = nn.GRU(I, H, layers, bias=bias, batch_first=batch_first, bidirectional=bidir).to(dtype)
    ours = GRU(I, H, layers, bias=bias, batch_first=batch_first, bidirectional=bidir).to(dtype)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def inputs(layers, bidir, batch_first, dtype, with_hx, T=6, B=3, I=5, H=7):
    x = torch.randn((B, T, I) if batch_first else (T, B, I), dtype=dtype, requires_grad=True)
    D = 2 if bidir else 1
    hx = torch.randn(layers * D, B, H, dtype=dtype, requires_grad=True) if with_hx else None
    return x, hx


def run(model, x, hx):
    out, h = model(x, hx) if hx is not None else model(x)
    assert isinstance(h, torch.Tensor)  # a GRU's state is h alone, not a tuple
    loss = out.square().sum() + h.sin().sum()
    leaves = [x, *([hx] if hx is not None else []), *model.parameters()]
    return [out, h, *torch.autograd.grad(loss, leaves)]


def test_parameter_names_shapes_and_order_match():
    for layers, bidir, bias in itertools.product([1, 3], [False, True], [True, False]):
        ref, ours = make_pair(layers, bidir, False, bias=bias)
        assert [(n, p.shape) for n, p in ref.named_parameters()] == [
            (n, p.shape) for n, p in ours.named_parameters()
        ]
        assert ours.weight_ih_l0.shape == (3 * 7, 5)  # three gate blocks r, z, n


def test_gru_takes_no_proj_size():
    with pytest.raises(TypeError):
        GRU(5, 7, proj_size=3)


@pytest.mark.parametrize("layers,bidir,batch_first,with_hx", GRID)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_path_is_bitwise_nn_gru(layers, bidir, batch_first, with_hx, dtype):
    ref, ours = make_pair(layers, bidir, batch_first, dtype)
    x, hx = inputs(layers, bidir, batch_first, dtype, with_hx)
    for a, b in zip(run(ref, x, hx), run(ours, x, hx), strict=True):
        assert torch.equal(a, b)


def test_fused_path_without_bias_is_bitwise_nn_gru():
    ref, ours = make_pair(2, True, False, bias=False)
    x, hx = inputs(2, True, False, torch.float32, True)
    for a, b in zip(run(ref, x, hx), run(ours, x, hx), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("layers,bidir,batch_first,with_hx", GRID)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_loop_path_matches_nn_gru(layers, bidir, batch_first, with_hx, dtype, tol, loop_impl):
    ref, ours = make_pair(layers, bidir, batch_first, dtype)
    ours.force_loop = True
    x, hx = inputs(layers, bidir, batch_first, dtype, with_hx)
    for a, b in zip(run(ref, x, hx), run(ours, x, hx), strict=True):
        torch.testing.assert_close(b, a, atol=tol, rtol=tol)


def test_loop_path_without_bias_matches_nn_gru(loop_impl):
    ref, ours = make_pair(2, True, False, torch.float64, bias=False)
    ours.force_loop = True
    x, hx = inputs(2, True, False, torch.float64, True)
    for a, b in zip(run(ref, x, hx), run(ours, x, hx), strict=True):
        torch.testing.assert_close(b, a, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("force_loop", [False, True])
def test_unbatched_input(force_loop):
    ref, ours = make_pair(2, True, False, torch.float64)
    ours.force_loop = force_loop
    x = torch.randn(6, 5, dtype=torch.float64)
    hx = torch.randn(4, 7, dtype=torch.float64)
    for args in [(x,), (x, hx)]:
        (a, ha), (b, hb) = ref(*args), ours(*args)
        assert b.shape == a.shape == (6, 14) and hb.shape == ha.shape == (4, 7)
        for u, v in ((a, b), (ha, hb)):
            torch.testing.assert_close(v, u, atol=1e-10, rtol=0)


@pytest.mark.parametrize("force_loop", [False, True])
@pytest.mark.parametrize("enforce_sorted", [True, False])
@pytest.mark.parametrize("bidir", [False, True])
def test_packed_sequence(force_loop, enforce_sorted, bidir):
    ref, ours = make_pair(2, bidir, True, torch.float64)
    ours.force_loop = force_loop
    lengths = torch.tensor([6, 4, 4, 1]) if enforce_sorted else torch.tensor([4, 6, 1, 4])
    x = torch.randn(4, 6, 5, dtype=torch.float64)
    packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=enforce_sorted)
    D = 2 if bidir else 1
    hx = torch.randn(2 * D, 4, 7, dtype=torch.float64)
    (a, ha), (b, hb) = ref(packed, hx), ours(packed, hx)
    assert torch.equal(a.batch_sizes, b.batch_sizes)
    assert (a.sorted_indices is None) == (b.sorted_indices is None)
    if a.sorted_indices is not None:
        assert torch.equal(a.sorted_indices, b.sorted_indices)
    for u, v in ((a.data, b.data), (ha, hb)):
        torch.testing.assert_close(v, u, atol=1e-10, rtol=0)


def test_state_dict_both_ways():
    torch_gru = nn.GRU(5, 7, 2, bidirectional=True)
    ours = GRU(5, 7, 2, bidirectional=True)
    ours.load_state_dict(torch_gru.state_dict())  # torch -> rnndrop
    back = nn.GRU(5, 7, 2, bidirectional=True)
    back.load_state_dict(ours.state_dict())  # rnndrop -> torch
    x = torch.randn(4, 3, 5)
    assert torch.equal(back(x)[0], torch_gru(x)[0])
    assert torch.equal(ours(x)[0], torch_gru(x)[0])
    assert list(ours.state_dict()) == list(torch_gru.state_dict())


def test_default_init_matches_nn_gru_distribution():
    torch.manual_seed(3)
    a = nn.GRU(5, 64, 2, bidirectional=True)
    torch.manual_seed(3)
    b = GRU(5, 64, 2, bidirectional=True)
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert na == nb and torch.equal(pa, pb)


def test_float_dropout_means_what_nn_gru_means():
    m = GRU(5, 7, 2, dropout=0.3)
    assert m.dropout.between_layers == 0.3 and m.dropout.time == "per_step"
    assert m.dropout.input == m.dropout.output == m.dropout.recurrent == 0
    assert GRU(5, 7, 2, dropout=0.0).dropout.any is False


def test_float_dropout_drops_between_layers_per_step_only():
    """nn.GRU(dropout=p): layer 1 sees layer 0's output times a fresh mask per step."""
    m = GRU(5, 7, 2, dropout=0.4).double()
    m.record_masks = True
    x = torch.randn(6, 3, 5, dtype=torch.float64)
    m(x)
    assert set(m.last_masks) == {"between_layers/l1"}
    mask = m.last_masks["between_layers/l1"]
    assert mask.shape == (6, 3, 7)
    assert not torch.equal(mask[0], mask[1])
    keep = keep_probability(0.4)  # the rate as the mask bits realise it
    assert set(mask.unique().tolist()) <= {0.0, 1 / keep}
    m.eval()  # eval: exactly nn.GRU
    ref = nn.GRU(5, 7, 2, dropout=0.4).double().eval()
    ref.load_state_dict(m.state_dict())
    assert torch.equal(m(x)[0], ref(x)[0])
