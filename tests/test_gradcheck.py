"""torch.autograd.gradcheck (float64) of the hand-written backprop through time."""

import pytest
import torch

from rnndrop.config import RecurrentDropout as RD
from rnndrop.nn import LSTM
from rnndrop.nn.cells import lstm_layer

F64 = torch.float64


def rand(*shape):
    return torch.randn(*shape, dtype=F64, requires_grad=True)


@pytest.mark.parametrize("G", [1, 4])
@pytest.mark.parametrize("masks", ["none", "rec", "rec_shared", "cand", "zone", "all"])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("projected", [False, True])
def test_layer_gradcheck(G, masks, reverse, projected, loop_impl):
    T, B, H, I = 4, 2, 3, 5
    g = torch.Generator().manual_seed(0)
    m = {
        "rec_mask": (torch.rand(T, G, B, H, generator=g) > 0.3).to(F64) / 0.7,
        "cand_mask": (torch.rand(T, B, H, generator=g) > 0.3).to(F64),
        "zone_h": (torch.rand(T, B, H, generator=g) > 0.5).to(F64),
        "zone_c": torch.rand(1, B, H, generator=g, dtype=F64),
    }
    chosen = {
        "none": [],
        "rec": ["rec_mask"],
        "cand": ["cand_mask"],
        "zone": ["zone_h", "zone_c"],
        "all": list(m),
        "rec_shared": ["rec_mask"],
    }[masks]
    kw = {k: m[k] for k in chosen}
    if masks == "rec_shared":
        kw["rec_mask"] = kw["rec_mask"][:1]
    h0, c0, w_hh = rand(B, H), rand(B, H), rand(4 * H, H)
    if projected:
        args = (rand(T, B, I), rand(4 * H, I), rand(4 * H), w_hh, h0, c0)
    else:
        args = (rand(T, B, 4 * H), None, None, w_hh, h0, c0)
    leaves = tuple(a for a in args if a is not None)

    def f(*xs):
        it = iter(xs)
        return lstm_layer(
            *[next(it) if a is not None else None for a in args], reverse=reverse, **kw
        )

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
