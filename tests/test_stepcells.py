"""rnndrop.nn.LSTMCell / GRUCell: drop-in torch cells, one step of the layer with its masks."""

import math

import pytest
import torch
from torch import nn

from rnndrop.config import RecurrentDropout as RD
from rnndrop.nn import GRU, LSTM, GRUCell, LSTMCell, mc_dropout
from rnndrop.nn.stepcells import CellMasks, _DroppedLinear

I, H = 5, 7
CELLS = {"lstm": (LSTMCell, nn.LSTMCell, LSTM), "gru": (GRUCell, nn.GRUCell, GRU)}
GATES = {"lstm": 4, "gru": 3}


def run_cell(cell, x, hx, kind, **kw):
    """Call a cell; returns (h, c or None, output)."""
    res = cell(x, hx, **kw)
    out = None
    if kw.get("return_output"):
        out, res = res
    h, c = res if kind == "lstm" else (res, None)
    return h, c, h if out is None else out


def state(kind, B, dtype=torch.float32, grad=False):
    def t():
        return torch.randn(B, H, dtype=dtype, requires_grad=grad)

    return (t(), t()) if kind == "lstm" else t()


# ---- drop-in for torch's cells -----------------------------------------------------------


@pytest.mark.parametrize("kind", CELLS)
@pytest.mark.parametrize("bias", [True, False])
def test_parameters_init_and_state_dicts_match_torch(kind, bias):
    ours_cls, ref_cls, _ = CELLS[kind]
    torch.manual_seed(3)
    ref = ref_cls(I, H, bias=bias)
    torch.manual_seed(3)
    ours = ours_cls(I, H, bias=bias)
    assert [(n, p.shape) for n, p in ref.named_parameters()] == [
        (n, p.shape) for n, p in ours.named_parameters()
    ]
    for (n, a), b in zip(ref.named_parameters(), ours.parameters(), strict=True):
        assert torch.equal(a, b), n  # same init, same order: U(-1/√H, 1/√H)
        assert a.abs().max() <= 1 / math.sqrt(H)
    fresh = ours_cls(I, H, bias=bias)
    fresh.load_state_dict(ref.state_dict())  # torch -> ours (strict)
    back = ref_cls(I, H, bias=bias)
    back.load_state_dict(fresh.state_dict())  # ours -> torch (strict)
    for a, b in zip(ref.parameters(), back.parameters(), strict=True):
        assert torch.equal(a, b)
    assert ours.bias is bias and (ours.bias_ih is None) is (not bias)


@pytest.mark.parametrize("kind", CELLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("with_hx", [False, True])
@pytest.mark.parametrize("batched", [True, False])
def test_without_dropout_outputs_and_grads_are_bitwise_torch(kind, dtype, with_hx, batched):
    ours_cls, ref_cls, _ = CELLS[kind]
    ref = ref_cls(I, H).to(dtype)
    ours = ours_cls(I, H).to(dtype)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(*((4,) if batched else ()), I, dtype=dtype, requires_grad=True)
    hx = None
    if with_hx:
        hx = state(kind, 4, dtype, grad=True)
        if not batched:
            hx = tuple(s[0].detach().requires_grad_() for s in hx) if kind == "lstm" else hx[0]

    def go(model):
        res = model(x, hx)
        res = res if kind == "lstm" else (res,)
        loss = sum((r * (k + 1)).sin().sum() for k, r in enumerate(res))
        leaves = [x, *((hx if kind == "lstm" else (hx,)) if with_hx else ()), *model.parameters()]
        return [*res, *torch.autograd.grad(loss, leaves)]

    a, b = go(ref), go(ours)
    assert a[0].shape == ((4, H) if batched else (H,))
    for u, v in zip(a, b, strict=True):
        assert torch.equal(u, v)


@pytest.mark.parametrize("kind", CELLS)
def test_inactive_dropout_in_eval_and_zero_rates_are_bitwise_torch(kind):
    ours_cls, ref_cls, _ = CELLS[kind]
    ref = ref_cls(I, H)
    cfg = RD(input=0.3, recurrent=0.2, candidate=0.2, weight_hh=0.4, tied=False)
    ours = ours_cls(I, H, dropout=cfg)
    ours.load_state_dict(ref.state_dict())
    x, hx = torch.randn(3, I), state(kind, 3)
    ours.eval()
    assert torch.equal(run_cell(ours, x, hx, kind)[0], run_cell(ref, x, hx, kind)[0])
    ours.train()  # training with only zero rates: torch's op too
    ours.dropout = RD()
    assert torch.equal(run_cell(ours, x, hx, kind)[0], run_cell(ref, x, hx, kind)[0])


def test_repr_and_argument_checks():
    cell = LSTMCell(I, H, bias=False, dropout="zoneout")
    assert "5, 7, bias=False" in repr(cell) and "zoneout" in repr(cell)
    with pytest.raises(ValueError, match="hidden_size"):
        LSTMCell(I, 0)
    with pytest.raises(ValueError, match="1D or 2D"):
        cell(torch.randn(2, 3, I))
    with pytest.raises(ValueError, match=r"hx\[1\] to be 1D or 2D"):
        cell(torch.randn(2, I), (torch.randn(2, H), torch.randn(1, 2, H)))
    with pytest.raises(RuntimeError, match="inconsistent input_size"):
        cell(torch.randn(2, I + 1))
    with pytest.raises(RuntimeError, match="hidden1 batch size"):
        cell(torch.randn(2, I), (torch.randn(2, H), torch.randn(3, H)))
    with pytest.raises(RuntimeError, match="is 2-D but the input is 1-D"):
        cell(torch.randn(I), (torch.randn(1, H), torch.randn(1, H)))
    with pytest.raises(RuntimeError, match="tuple"):
        cell(torch.randn(2, I), torch.randn(2, H))
    with pytest.raises(RuntimeError, match="tensor h_0"):
        GRUCell(I, H)(torch.randn(2, I), (torch.randn(2, H),))


def test_gru_rejects_zoneout_cell_and_between_layers_warns():
    with pytest.raises(ValueError, match="zoneout_cell"):
        GRUCell(I, H, dropout=RD(zoneout_cell=0.3))
    GRUCell(I, H, dropout=RD(zoneout_hidden=0.3))  # fine
    with pytest.warns(UserWarning, match="between_layers=0.3 has no meaning for a single cell"):
        LSTMCell(I, H, dropout=RD(between_layers=0.3, input=0.2))
    with pytest.warns(UserWarning, match="between_layers"):
        GRUCell(I, H, dropout=0.3)  # a float means between_layers, as for nn.GRU


# ---- one step of the layer ----------------------------------------------------------------

SCHEMES = {
    "variational_untied": RD(input=0.3, recurrent=0.25, output=0.2, tied=False),
    "variational_tied_per_batch": RD(input=0.3, recurrent=0.25, output=0.2, batch="per_batch"),
    "untied_per_batch": RD(input=0.3, recurrent=0.25, tied=False, batch="per_batch"),
    "zoneout": RD(zoneout_hidden=0.2, zoneout_cell=0.4),
    "semeniuta_per_step": RD.semeniuta(0.3),
    "semeniuta_per_sequence": RD.semeniuta(0.3, time="per_sequence"),
    "weight_drop": RD.weight_drop(0.4),
    "naive_recurrent": RD(input=0.3, recurrent=0.2, output=0.3, time="per_step", tied=False),
    "classic_mix": RD(recurrent=0.2, candidate=0.25, weight_hh=0.3, output=0.2, scaling="classic"),
    "everything": RD(
        input=0.2,
        recurrent=0.2,
        candidate=0.1,
        weight_hh=0.3,
        output=0.1,
        zoneout_hidden=0.1,
        zoneout_cell=0.2,
        tied=False,
    ),
}


def gru_cfg(cfg):
    return cfg.replace(zoneout_cell=0.0)


def cell_like_layer(kind, cfg, dtype=torch.float64):
    ours_cls, _, layer_cls = CELLS[kind]
    cfg = cfg if kind == "lstm" else gru_cfg(cfg)
    layer = layer_cls(I, H, dropout=cfg).to(dtype)
    cell = ours_cls(I, H, dropout=cfg).to(dtype)
    cell.load_state_dict({k.removesuffix("_l0"): v for k, v in layer.state_dict().items()})
    return layer, cell


def loop_cell(cell, kind, x, hx, masks_for_step):
    outs = []
    for t in range(x.shape[0]):
        h, c, out = run_cell(cell, x[t], hx, kind, masks=masks_for_step(t), return_output=True)
        hx = (h, c) if kind == "lstm" else h
        outs.append(out)
    return torch.stack(outs), hx


def grads(loss, leaves):
    return torch.autograd.grad(loss, leaves, allow_unused=True)


@pytest.mark.parametrize("kind", CELLS)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_cell_loop_with_the_layers_masks_is_the_layer(kind, scheme):
    layer, cell = cell_like_layer(kind, SCHEMES[scheme])
    T, B = 5, 3
    x = torch.randn(T, B, I, dtype=torch.float64, requires_grad=True)
    hx = state(kind, B, torch.float64, grad=True)
    layer_hx = tuple(s.unsqueeze(0) for s in hx) if kind == "lstm" else hx.unsqueeze(0)
    layer.record_masks = True
    out, final = layer(x, layer_hx)
    final = final if kind == "lstm" else (final,)
    rec = layer.last_masks
    assert rec, "the layer drew no masks"
    leaves = [x, *(hx if kind == "lstm" else (hx,))]

    def loss_of(out, final):
        return out.sin().sum() + sum((s * (k + 2)).cos().sum() for k, s in enumerate(final))

    ref = [out, *final, *grads(loss_of(out, final), leaves + list(layer.parameters()))]
    cell_out, cell_final = loop_cell(cell, kind, x, hx, lambda t: cell.masks_from(rec, t))
    cell_final = cell_final if kind == "lstm" else (cell_final,)
    cell_final = [s.unsqueeze(0) for s in cell_final]
    got = [
        cell_out,
        *cell_final,
        *grads(loss_of(cell_out, cell_final), leaves + list(cell.parameters())),
    ]
    for k, (a, b) in enumerate(zip(ref, got, strict=True)):
        assert a is not None and b is not None, k
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12, msg=f"item {k}")


@pytest.mark.parametrize("kind", CELLS)
def test_kept_masks_are_one_masks_object_for_the_sequence(kind):
    """A sequence scope runs the sequence as an explicit object with the first call's masks."""
    cfg = RD(input=0.3, recurrent=0.3, candidate=0.2, weight_hh=0.3, tied=False)
    _, cell = cell_like_layer(kind, cfg)
    cell.record_masks = True
    x = torch.randn(4, 2, I, dtype=torch.float64)
    hx, outs = state(kind, 2, torch.float64), []  # started from a given state (a decoder)
    start = hx
    with cell.sequence():
        for t in range(4):
            h, c, _ = run_cell(cell, x[t], hx, kind)
            hx = (h, c) if kind == "lstm" else h
            outs.append(h)
            if t == 0:
                first = cell.masks_from(cell.last_masks, 0)
    again, _ = loop_cell(cell, kind, x, start, lambda t: first)
    assert torch.equal(torch.stack(outs), again)


@pytest.mark.parametrize("kind", CELLS)
def test_eval_cell_loop_is_the_eval_layer(kind):
    cfg = RD(
        recurrent=0.2,
        candidate=0.25,
        weight_hh=0.3,
        output=0.2,
        input=0.1,
        zoneout_hidden=0.2,
        zoneout_cell=0.3,
        scaling="classic",
    )
    layer, cell = cell_like_layer(kind, cfg)
    layer.eval()
    cell.eval()
    cell.record_masks = True
    x = torch.randn(5, 3, I, dtype=torch.float64)
    hx = state(kind, 3, torch.float64)
    layer_hx = tuple(s.unsqueeze(0) for s in hx) if kind == "lstm" else hx.unsqueeze(0)
    out, final = layer(x, layer_hx)
    cell_out, cell_final = loop_cell(cell, kind, x, hx, lambda t: None)
    torch.testing.assert_close(cell_out, out, rtol=1e-12, atol=1e-12)
    final = final if kind == "lstm" else (final,)
    cell_final = cell_final if kind == "lstm" else (cell_final,)
    for a, b in zip(final, cell_final, strict=True):
        torch.testing.assert_close(b, a[0], rtol=1e-12, atol=1e-12)
    assert cell.last_masks == {}  # nothing drawn


# ---- keeping masks across calls -----------------------------------------------------------


def per_sequence_cell(kind, **kw):
    cfg = RD(input=0.4, recurrent=0.4, candidate=0.4, weight_hh=0.4, output=0.4, tied=False, **kw)
    cell = CELLS[kind][0](I, H, dropout=cfg)
    cell.record_masks = True
    return cell


def step(cell, kind, x, hx, **kw):
    h, c, out = run_cell(cell, x, hx, kind, return_output=True, **kw)
    return ((h, c) if kind == "lstm" else h), out, dict(cell.last_masks)


SEQ_SITES = ("input/l0", "recurrent/l0", "candidate/l0", "weight_hh/l0", "output")


@pytest.mark.parametrize("kind", CELLS)
def test_per_sequence_masks_are_kept_for_the_scope_and_redrawn_by_reset(kind):
    cell = per_sequence_cell(kind)
    x = torch.randn(6, I)
    with cell.sequence() as masks:
        hx, _, m0 = step(cell, kind, x, None)
        hx, _, m1 = step(cell, kind, x, hx)
        hx, _, m2 = step(cell, kind, x, hx)
        assert set(m0) == set(SEQ_SITES)
        assert masks.batch_size == 6 and torch.equal(masks.weight_hh, m0["weight_hh/l0"])
        for site in SEQ_SITES:
            assert torch.equal(m0[site], m1[site]) and torch.equal(m1[site], m2[site]), site
        cell.reset()  # a new sequence inside the scope (an episode boundary)
        hx, _, m3 = step(cell, kind, x, hx)
        _, _, m4 = step(cell, kind, x, hx)
        for site in SEQ_SITES:
            assert not torch.equal(m2[site], m3[site]), site
            assert torch.equal(m3[site], m4[site]), site
    with cell.sequence():  # the next scope: new masks, even from the same state
        _, _, m5 = step(cell, kind, x, hx)
    for site in SEQ_SITES:
        assert not torch.equal(m4[site], m5[site]), site


@pytest.mark.parametrize("kind", CELLS)
def test_explicit_masks_object_is_used_and_independent_of_the_kept_one(kind):
    cell = per_sequence_cell(kind)
    x = torch.randn(6, I)
    masks = cell.sample_masks(6)
    assert {s for s, _ in masks.items()} == {
        "input",
        "recurrent",
        "candidate",
        "output",
        "weight_hh",
    }
    hx, out0, m0 = step(cell, kind, x, None, masks=masks)  # hx=None does not redraw it
    hx, _, m1 = step(cell, kind, x, hx, masks=masks)
    for site in SEQ_SITES:
        assert torch.equal(m0[site], m1[site])
    assert torch.equal(m0["weight_hh/l0"], masks.weight_hh)
    _, out_again, _ = step(cell, kind, x, None, masks=masks)
    assert torch.equal(out0, out_again)  # same masks, same start: same step
    # an explicit object draws what it lacks once, and keeps it
    partial = CellMasks(batch_size=6, recurrent=masks.recurrent)
    step(cell, kind, x, None, masks=partial)
    assert partial.weight_hh is not None and torch.equal(partial.recurrent, masks.recurrent)


@pytest.mark.parametrize("kind", CELLS)
def test_per_step_masks_differ_between_calls(kind):
    cfg = RD(
        input=0.4, recurrent=0.4, candidate=0.4, output=0.4, zoneout_hidden=0.4, time="per_step"
    )
    cell = CELLS[kind][0](I, H, dropout=cfg)
    cell.record_masks = True
    x = torch.randn(6, I)
    hx, _, m0 = step(cell, kind, x, None)
    _, _, m1 = step(cell, kind, x, hx)
    assert set(m0) == {"input/l0", "recurrent/l0", "candidate/l0", "output", "zoneout_hidden/l0"}
    for site in m0:
        assert not torch.equal(m0[site], m1[site]), site
    # nothing per sequence: no scope needed, and a batch-size change is fine
    step(cell, kind, torch.randn(2, I), state(kind, 2))


def test_zoneout_is_drawn_every_call_even_with_a_masks_object():
    cell = LSTMCell(I, H, dropout=RD(zoneout_hidden=0.5, zoneout_cell=0.5, weight_hh=0.3))
    cell.record_masks = True
    masks = cell.sample_masks(8)
    x = torch.randn(8, I)
    hx, _, m0 = step(cell, "lstm", x, None, masks=masks)
    _, _, m1 = step(cell, "lstm", x, hx, masks=masks)
    assert not torch.equal(m0["zoneout_hidden/l0"], m1["zoneout_hidden/l0"])
    assert not torch.equal(m0["zoneout_cell/l0"], m1["zoneout_cell/l0"])
    assert masks.zoneout_hidden is None  # never stored


@pytest.mark.parametrize("kind", CELLS)
def test_batch_size_change_inside_a_scope_raises(kind):
    cell = per_sequence_cell(kind)
    with cell.sequence():
        step(cell, kind, torch.randn(6, I), None)
        with pytest.raises(RuntimeError, match="batch size 6, this call has 4"):
            step(cell, kind, torch.randn(4, I), state(kind, 4))
    with cell.sequence(4):
        step(cell, kind, torch.randn(4, I), state(kind, 4))  # fine in a new scope
    step(cell, kind, torch.randn(3, I), None)  # and alone, from hx=None
    masks = cell.sample_masks(3)
    with pytest.raises(RuntimeError, match="batch size 3"):
        step(cell, kind, torch.randn(5, I), None, masks=masks)


def test_scope_masks_are_redrawn_when_the_module_moves_or_switches_mode():
    cell = per_sequence_cell("lstm")
    with cell.sequence() as masks:
        hx, _, _ = step(cell, "lstm", torch.randn(2, I), None)
        assert masks.input is not None
        cell.eval()
        cell.train()
        assert masks.items() == []
        hx, _, _ = step(cell, "lstm", torch.randn(2, I), hx)
        cell.double()  # moving the module resets them
        assert masks.items() == []
        hx = tuple(s.double() for s in hx)
        hx, _, _ = step(cell, "lstm", torch.randn(2, I, dtype=torch.float64), hx)
        assert masks.input.dtype == torch.float64
        masks.input = masks.input.float()  # a stale float32 mask
        with pytest.raises(ValueError, match="float32"):
            step(cell, "lstm", torch.randn(2, I, dtype=torch.float64), hx)


def test_explicit_masks_are_checked():
    cell = per_sequence_cell("lstm")
    x = torch.randn(4, I)
    with pytest.raises(ValueError, match="zoneout_hidden=0"):
        cell(x, masks=CellMasks(zoneout_hidden=torch.ones(4, H)), return_output=True)
    with pytest.raises(ValueError, match="'recurrent' mask has shape"):
        cell(x, masks=CellMasks(recurrent=torch.ones(2, 4, H)), return_output=True)
    with pytest.raises(ValueError, match="'input' mask has shape"):
        cell(x, masks=CellMasks(input=torch.ones(4, I + 1)), return_output=True)
    with pytest.raises(ValueError, match="float64"):
        cell(
            x,
            masks=CellMasks(weight_hh=torch.ones(4 * H, H, dtype=torch.float64)),
            return_output=True,
        )
    with pytest.raises(TypeError, match="CellMasks"):
        cell(x, masks={"input": torch.ones(4, I)}, return_output=True)


def test_truncated_bptt_with_kept_masks_backprops_each_window():
    """Kept masks hold no graph: backward per window and optimizer steps in between work."""
    cell = LSTMCell(I, H, dropout=RD(weight_hh=0.5, recurrent=0.3, input=0.2))
    opt = torch.optim.SGD(cell.parameters(), lr=0.1)
    hx = None
    x = torch.randn(6, 3, I)
    with cell.sequence():  # one sequence, two windows
        for window in (x[:3], x[3:]):
            loss = 0
            for x_t in window:
                hx = cell(x_t, hx)
                loss = loss + hx[0].square().sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            hx = tuple(s.detach() for s in hx)


# ---- eval, MC mode, expectations ----------------------------------------------------------


@pytest.mark.parametrize("kind", CELLS)
def test_eval_draws_nothing_and_applies_expectations(kind):
    ours_cls, ref_cls, _ = CELLS[kind]
    p_in, p_out, zh, zc = 0.3, 0.2, 0.25, 0.4
    cfg = RD(
        input=p_in,
        output=p_out,
        zoneout_hidden=zh,
        zoneout_cell=zc if kind == "lstm" else 0,
        scaling="classic",
    )
    ref = ref_cls(I, H)
    cell = ours_cls(I, H, dropout=cfg)
    cell.load_state_dict(ref.state_dict())
    cell.eval()
    cell.record_masks = True
    x, hx = torch.randn(3, I), state(kind, 3)
    h, c, out = run_cell(cell, x, hx, kind, return_output=True)
    assert cell.last_masks == {}
    h_ref, c_ref, _ = run_cell(ref, x * (1 - p_in), hx, kind)
    h_prev = hx[0] if kind == "lstm" else hx
    torch.testing.assert_close(h, zh * h_prev + (1 - zh) * h_ref)
    torch.testing.assert_close(out, h * (1 - p_out))
    if kind == "lstm":
        torch.testing.assert_close(c, zc * hx[1] + (1 - zc) * c_ref)
    # the masks object is ignored in eval
    assert cell.sample_masks(3).items() == []


@pytest.mark.parametrize("kind", CELLS)
def test_mc_dropout_samples_in_eval(kind):
    cell = per_sequence_cell(kind)
    cell.eval()
    x = torch.randn(4, I)
    with torch.no_grad():
        a = run_cell(cell, x, None, kind, return_output=True)[2]
        assert torch.equal(a, run_cell(cell, x, None, kind, return_output=True)[2])
        with mc_dropout(cell):
            b = run_cell(cell, x, None, kind, return_output=True)[2]
            assert set(cell.last_masks) == set(SEQ_SITES)
            c = run_cell(cell, x, None, kind, return_output=True)[2]
    assert not torch.equal(a, b) and not torch.equal(b, c)


# ---- masks: statistics, recording, output ------------------------------------------------


def test_masks_have_mean_one_and_zoneout_mean_z():
    B, p, z = 3000, 0.3, 0.2
    cfg = RD(
        input=p,
        recurrent=p,
        candidate=p,
        output=p,
        weight_hh=p,
        zoneout_hidden=z,
        zoneout_cell=z,
        tied=False,
    )
    cell = LSTMCell(I, H, dropout=cfg)
    cell.record_masks = True
    cell(torch.randn(B, I), return_output=True)
    for site, m in cell.last_masks.items():
        n = m.numel()
        if site.startswith("zoneout"):
            sd = math.sqrt(z * (1 - z) / n)
            assert set(m.unique().tolist()) <= {0.0, 1.0}
            assert abs(m.mean().item() - z) < 5 * sd, site
        else:
            sd = math.sqrt(p / (1 - p) / n)
            assert abs(m.mean().item() - 1) < 5 * sd, site
            assert (m == 0).any() and m.max().item() == pytest.approx(1 / (1 - p), rel=1e-4)


@pytest.mark.parametrize("kind", CELLS)
@pytest.mark.parametrize("batch", ["per_sample", "per_batch"])
def test_recorded_masks_have_the_layers_names_and_per_step_shapes(kind, batch):
    cfg = RD(
        input=0.3,
        recurrent=0.3,
        candidate=0.3,
        output=0.3,
        weight_hh=0.3,
        zoneout_hidden=0.1,
        zoneout_cell=0.1 if kind == "lstm" else 0,
        tied=False,
        batch=batch,
    )
    cell = CELLS[kind][0](I, H, dropout=cfg)
    cell.record_masks = True
    B, G = 4, GATES[kind]
    Bm = B if batch == "per_sample" else 1
    x = torch.randn(B, I)
    h, _, out = run_cell(cell, x, None, kind, return_output=True)
    want = {
        "input/l0": (G, 1, Bm, I),
        "recurrent/l0": (1, G, Bm, H),
        "candidate/l0": (1, Bm, H),
        "output": (1, Bm, H),
        "weight_hh/l0": (G * H, H),
        "zoneout_hidden/l0": (1, B, H),
    }
    if kind == "lstm":
        want["zoneout_cell/l0"] = (1, B, H)
    assert {k: tuple(v.shape) for k, v in cell.last_masks.items()} == want
    torch.testing.assert_close(out, h * cell.last_masks["output"][0])
    # the record replays the call
    replay = cell.masks_from(cell.last_masks, 0)
    h2, _, out2 = run_cell(cell, x, None, kind, masks=replay, return_output=True)
    assert torch.equal(out, out2) and torch.equal(h, h2)
    cell.record_masks = False
    cell(x, return_output=True)
    assert set(cell.last_masks) == set(want)  # not recording: last record left alone


def test_output_site_masks_the_output_not_the_state():
    ref = nn.LSTMCell(I, H)
    cell = LSTMCell(I, H, dropout=RD(output=0.5))
    cell.load_state_dict(ref.state_dict())
    x, hx = torch.randn(5, I), state("lstm", 5)
    with pytest.raises(ValueError, match="return_output=True"):
        cell(x, hx)
    cell.record_masks = True
    with cell.sequence():
        out, (h, c) = cell(x, hx, return_output=True)
    h_ref, c_ref = ref(x, hx)
    assert torch.equal(h, h_ref) and torch.equal(c, c_ref)  # the state is undropped
    assert torch.equal(out, h * cell.last_masks["output"][0]) and (out == 0).any()


def test_unbatched_input_is_a_batch_of_one():
    cell = LSTMCell(I, H, dropout=RD(zoneout_hidden=0.3, recurrent=0.3, output=0.2))
    cell.record_masks = True
    x, hx = torch.randn(I), (torch.randn(H), torch.randn(H))
    with cell.sequence():
        out, (h, c) = cell(x, hx, return_output=True)
    assert out.shape == h.shape == c.shape == (H,)
    replay = cell.masks_from(cell.last_masks, 0)
    out2, (h2, c2) = cell(x[None], (hx[0][None], hx[1][None]), masks=replay, return_output=True)
    assert torch.equal(out2[0], out) and torch.equal(h2[0], h) and torch.equal(c2[0], c)


# ---- weight drop: no per-step copies ------------------------------------------------------


def test_dropped_linear_gradients_and_double_backward():
    h = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    mask = (torch.rand(6, 4, dtype=torch.float64) > 0.4).double() * 2.0
    torch.autograd.gradcheck(_DroppedLinear.apply, (h, w, mask))
    torch.autograd.gradgradcheck(_DroppedLinear.apply, (h, w, mask))


@pytest.mark.parametrize("kind", CELLS)
@pytest.mark.parametrize("tied", [True, False])
def test_weight_drop_saves_no_weight_sized_copy_per_step(kind, tied):
    cell = CELLS[kind][0](I, H, dropout=RD(weight_hh=0.5, recurrent=0.2, tied=tied))
    G, T = GATES[kind], 6
    storages = set()

    def pack(t):
        storage = t.untyped_storage()
        if storage.nbytes() >= G * H * H * t.element_size():  # W_hh-sized
            storages.add(storage.data_ptr())
        return t

    hx = None
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), cell.sequence():
        for _ in range(T):
            hx = cell(torch.randn(2, I), hx)
    # W_hh and the sequence's one mask; not one W_hh ⊙ M per step
    assert len(storages) == 2, len(storages)
