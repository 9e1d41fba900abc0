"""torch.autograd.gradcheck (float64) of the hand-written backprop through time."""

import pytest
import torch

from rnndrop.config import RecurrentDropout as RD
from rnndrop.kernels import LayerMasks, rnn_layer
from rnndrop.nn import GRU, LSTM
from rnndrop.nn.cells import GRU_CELL, LSTM_CELL

F64 = torch.float64


def rand(*shape):
    return torch.randn(*shape, dtype=F64, requires_grad=True)


@pytest.mark.parametrize("cell", [LSTM_CELL, GRU_CELL], ids=lambda c: c.name)
@pytest.mark.parametrize("untied", [False, True])
@pytest.mark.parametrize("masks", ["none", "rec", "rec_shared", "input", "cand", "zone", "all"])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("projected", [False, True])
def test_layer_gradcheck(cell, untied, masks, reverse, projected, loop_impl):
    T, B, H, I, G = 4, 2, 3, 5, cell.gates
    Gr = G if untied else 1
    g = torch.Generator().manual_seed(0)
    m = {
        "recurrent": (torch.rand(T, Gr, B, H, generator=g) > 0.3).to(F64) / 0.7,
        "input": (torch.rand(G, T, B, I, generator=g) > 0.3).to(F64) / 0.7,
        "candidate": (torch.rand(T, B, H, generator=g) > 0.3).to(F64),
        "zoneout_h": (torch.rand(T, B, H, generator=g) > 0.5).to(F64),
        "zoneout_c": torch.rand(1, B, H, generator=g, dtype=F64),
    }
    chosen = {
        "none": [],
        "rec": ["recurrent"],
        "rec_shared": ["recurrent"],
        "input": ["input"],
        "cand": ["candidate"],
        "zone": ["zoneout_h", "zoneout_c"],
        "all": list(m),
    }[masks]
    if not cell.has_cell:
        chosen = [k for k in chosen if k != "zoneout_c"]
    if projected is False:
        chosen = [k for k in chosen if k != "input"]  # the projection is the input
    kw = {k: m[k] for k in chosen}
    if masks == "rec_shared":
        kw["recurrent"] = kw["recurrent"][:1]
    h0, w_hh = rand(B, H), rand(G * H, H)
    c0 = rand(B, H) if cell.has_cell else None
    b_h = rand(G * H) if cell.split_recurrent else None
    if projected:
        args = (rand(T, B, I), rand(G * H, I), rand(G * H), w_hh, b_h, h0, c0)
    else:
        args = (rand(T, B, G * H), None, None, w_hh, b_h, h0, c0)
    leaves = tuple(a for a in args if a is not None)

    def f(*xs):
        it = iter(xs)
        full = [next(it) if a is not None else None for a in args]
        h_seq, c_last = rnn_layer(cell, *full, LayerMasks(**kw), reverse=reverse)
        return h_seq if c_last is None else (h_seq, c_last)

    assert torch.autograd.gradcheck(f, leaves)


@pytest.mark.parametrize(
    "cfg",
    [
        RD.variational(0.3, tied=False),
        RD.zoneout(0.2, 0.3),
        RD.semeniuta(0.3),
        RD.awd(),
        RD.naive_recurrent(0.3),
    ],
    ids=lambda c: c.describe(),
)
def test_module_gradcheck_with_masks_fixed_by_seed(cfg, loop_impl):
    lstm = LSTM(3, 4, 2, bidirectional=True, dropout=cfg).to(F64)
    x, h0, c0 = rand(3, 2, 3), rand(4, 2, 4), rand(4, 2, 4)

    def f(x, h0, c0, *params):
        with torch.random.fork_rng():
            torch.manual_seed(0)  # the same masks at every evaluation
            out, (h, c) = torch.func.functional_call(
                lstm,
                dict(zip([n for n, _ in lstm.named_parameters()], params, strict=True)),
                (x, (h0, c0)),
            )
        return out, h, c

    assert torch.autograd.gradcheck(f, (x, h0, c0, *lstm.parameters()))


@pytest.mark.parametrize(
    "cfg",
    [
        RD.variational(0.3, tied=False),
        RD.zoneout(0.2, 0.0),  # a GRU has no cell state: zoneout on h only
        RD.semeniuta(0.3),
        RD.awd(),
        RD.naive_recurrent(0.3),
        RD(recurrent=0.3, candidate=0.2, zoneout_hidden=0.2, weight_hh=0.2, tied=False),
    ],
    ids=lambda c: c.describe(),
)
def test_gru_module_gradcheck_with_masks_fixed_by_seed(cfg, loop_impl):
    gru = GRU(3, 4, 2, bidirectional=True, dropout=cfg).to(F64)
    x, h0 = rand(3, 2, 3), rand(4, 2, 4)
    names = [n for n, _ in gru.named_parameters()]

    def f(x, h0, *params):
        with torch.random.fork_rng():
            torch.manual_seed(0)  # the same masks at every evaluation
            out, h = torch.func.functional_call(gru, dict(zip(names, params, strict=True)), (x, h0))
        return out, h

    assert torch.autograd.gradcheck(f, (x, h0, *gru.parameters()))
