"""Step cells as issue 20 found them: a decoder started from a given state, Monte Carlo
passes, the README's preset example, and per-row masks for a recurrent RL policy.

A per-sequence scheme that samples must never reuse one sequence's masks for the next: each
sequence gets fresh masks (a ``sequence()`` scope, or ``masks=``) or the call raises.
"""

import math
import warnings

import pytest
import torch
from torch import nn

import rnndrop.nn
from rnndrop.config import RecurrentDropout as RD
from rnndrop.nn import CellMasks, GRUCell, LSTMCell, mc_dropout

I, H = 6, 16
CELLS = {"lstm": LSTMCell, "gru": GRUCell}


def zeros_state(kind, B):
    h = torch.zeros(B, H)
    return (h, h.clone()) if kind == "lstm" else h


def given_state(kind, B, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, H, generator=g)
    return (h, torch.randn(B, H, generator=g)) if kind == "lstm" else h


def first(hx):
    return hx[0] if isinstance(hx, tuple) else hx


class Decoder(nn.Module):
    """A decoder as the issue wrote it: started from the encoder's state, never hx=None."""

    def __init__(self, kind, dropout, scoped=True):
        super().__init__()
        self.cell = CELLS[kind](I, H, dropout=dropout)
        self.scoped = scoped

    def run(self, xs, hx):
        outs = []
        for x_t in xs:
            hx = self.cell(x_t, hx)
            outs.append(first(hx))
        return torch.stack(outs)

    def forward(self, xs, hx):
        if not self.scoped:
            return self.run(xs, hx)
        with self.cell.sequence():  # one forward, one sequence
            return self.run(xs, hx)


VARIATIONAL = RD(input=0.3, recurrent=0.3)


# ---- never silent reuse --------------------------------------------------------------------


@pytest.mark.parametrize("kind", CELLS)
def test_decoder_from_a_given_state_without_a_scope_raises_and_says_how(kind):
    dec = Decoder(kind, VARIATIONAL, scoped=False)
    xs, hx = torch.randn(3, 4, I), given_state(kind, 4)
    with pytest.raises(RuntimeError) as err:
        dec(xs, hx)
    msg = str(err.value)
    assert "with cell.sequence():" in msg and "masks=cell.sample_masks(4)" in msg
    # a second attempt raises too: nothing was kept from the first
    with pytest.raises(RuntimeError, match="continues a sequence"):
        dec(xs, hx)


@pytest.mark.parametrize("kind", CELLS)
def test_decoder_sequences_get_fresh_masks_per_scope(kind):
    """Two training forwards from the same state and input: different masks, so different
    outputs; inside one forward every step used the same masks."""
    dec = Decoder(kind, VARIATIONAL)
    dec.cell.record_masks = True
    xs, hx = torch.randn(3, 4, I), given_state(kind, 4)
    seen = []
    for _ in range(3):
        with dec.cell.sequence():
            steps = []
            h = hx
            for x_t in xs:
                h = dec.cell(x_t, h)
                steps.append(dict(dec.cell.last_masks))
        for site in ("input/l0", "recurrent/l0"):
            assert all(torch.equal(s[site], steps[0][site]) for s in steps), site
        seen.append(steps[0])
    for a, b in ((0, 1), (1, 2), (0, 2)):
        for site in ("input/l0", "recurrent/l0"):
            assert not torch.equal(seen[a][site], seen[b][site]), (a, b, site)
    assert not torch.equal(dec(xs, hx), dec(xs, hx))


@pytest.mark.parametrize("kind", CELLS)
def test_mc_passes_of_a_scoped_decoder_are_all_distinct(kind):
    """The issue's symptom: five MC passes gave one distinct output (zero uncertainty)."""
    dec = Decoder(kind, VARIATIONAL).eval()
    xs, hx = torch.randn(3, 4, I), given_state(kind, 4)
    with torch.no_grad():
        det = dec(xs, hx)
        assert torch.equal(det, dec(xs, hx))  # eval: deterministic, no ceremony
        with mc_dropout(dec):
            passes = [dec(xs, hx) for _ in range(5)]
    distinct = {tuple(p.flatten().tolist()) for p in passes}
    assert len(distinct) == 5


@pytest.mark.parametrize("kind", CELLS)
def test_mc_passes_of_an_unscoped_decoder_raise(kind):
    dec = Decoder(kind, VARIATIONAL, scoped=False).eval()
    xs, hx = torch.randn(3, 4, I), given_state(kind, 4)
    with torch.no_grad():
        dec(xs, hx)  # deterministic eval needs no scope
        with mc_dropout(dec), pytest.raises(RuntimeError, match=r"cell\.sequence\(\)"):
            dec(xs, hx)


def test_model_wide_sequence_scope_covers_every_cell():
    """rnndrop.nn.sequence(model): one scope on each cell of a two-cell decoder."""

    class TwoCells(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = LSTMCell(I, H, dropout=VARIATIONAL)
            self.b = GRUCell(H, H, dropout=VARIATIONAL)

        def forward(self, xs, hx):
            ha, hb = hx, hx[0]
            for x_t in xs:
                ha = self.a(x_t, ha)
                hb = self.b(ha[0], hb)
            return hb

    model = TwoCells().eval()
    xs, hx = torch.randn(4, 3, I), given_state("lstm", 3)
    with torch.no_grad(), mc_dropout(model):
        with pytest.raises(RuntimeError):
            model(xs, hx)
        outs = []
        for _ in range(4):
            with rnndrop.nn.sequence(model):
                outs.append(model(xs, hx))
    assert len({tuple(o.flatten().tolist()) for o in outs}) == 4
    assert model.a._open_scopes() == [] and model.b._open_scopes() == []  # closed on exit


@pytest.mark.parametrize("kind", CELLS)
def test_explicit_masks_need_no_scope_and_are_the_sequence(kind):
    cell = CELLS[kind](I, H, dropout=VARIATIONAL)
    xs, hx = torch.randn(3, 4, I), given_state(kind, 4)
    masks = cell.sample_masks(4)
    outs = []
    for _ in range(2):
        h = hx
        for x_t in xs:
            h = cell(x_t, h, masks=masks)
        outs.append(first(h))
    assert torch.equal(outs[0], outs[1])  # the same masks object: the same sequence


@pytest.mark.parametrize("kind", CELLS)
@pytest.mark.parametrize(
    "cfg",
    [RD(input=0.3, recurrent=0.3, time="per_step"), RD(zoneout_hidden=0.3), RD.semeniuta(0.3)],
    ids=["per_step", "zoneout", "semeniuta_per_step"],
)
def test_schemes_without_per_sequence_masks_need_no_ceremony(kind, cfg):
    dec = Decoder(kind, cfg, scoped=False)
    xs, hx = torch.randn(3, 4, I), given_state(kind, 4)
    a, b = dec(xs, hx), dec(xs, hx)  # training, from a given state, no scope
    assert not torch.equal(a, b)  # fresh masks at every call
    dec.eval()
    assert torch.equal(dec(xs, hx), dec(xs, hx))


def test_scope_with_a_batch_size_draws_at_entry_and_checks_it():
    cell = LSTMCell(I, H, dropout=VARIATIONAL)
    with cell.sequence(5) as masks:
        assert masks.batch_size == 5 and masks.input is not None
        drawn = masks.input.clone()
        cell(torch.randn(5, I), given_state("lstm", 5))
        assert torch.equal(masks.input, drawn)
        with pytest.raises(RuntimeError, match="batch size 5, this call has 3"):
            cell(torch.randn(3, I), given_state("lstm", 3))
    cell.eval()
    with cell.sequence(5) as masks:
        assert masks.items() == []  # eval draws nothing


def test_nested_scopes_use_the_innermost():
    cell = LSTMCell(I, H, dropout=VARIATIONAL)
    cell.record_masks = True
    hx = given_state("lstm", 2)
    with cell.sequence() as outer:
        cell(torch.randn(2, I), hx)
        with cell.sequence() as inner:
            cell(torch.randn(2, I), hx)
        cell(torch.randn(2, I), hx)
        assert torch.equal(cell.last_masks["input/l0"][0], outer.input)
    assert not torch.equal(outer.input, inner.input)


def test_a_copy_made_inside_a_scope_is_outside_it():
    import copy
    import pickle

    cell = LSTMCell(I, H, dropout=VARIATIONAL)
    hx = given_state("lstm", 2)
    with cell.sequence():
        cell(torch.randn(2, I), hx)
        twins = [copy.deepcopy(cell), pickle.loads(pickle.dumps(cell))]
    for twin in twins:
        assert twin._open_scopes() == []
        with pytest.raises(RuntimeError, match="continues a sequence"):
            twin(torch.randn(2, I), hx)  # no masks carried over from the scope
        torch.testing.assert_close(twin.weight_hh, cell.weight_hh)


# ---- presets read for one cell: the README's example -----------------------------------------


@pytest.mark.parametrize("kind", CELLS)
def test_readme_preset_example_works_as_written(kind):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no between_layers warning for a cell
        cell = CELLS[kind](32, 64, dropout="variational")
    cfg = cell.dropout
    assert (cfg.input, cfg.recurrent) == (0.25, 0.25)  # the preset's default p
    assert (cfg.between_layers, cfg.output, cfg.embedding) == (0.0, 0.0, 0.0)
    masks = cell.sample_masks(batch_size=8)
    hx = (torch.zeros(8, 64), torch.zeros(8, 64)) if kind == "lstm" else torch.zeros(8, 64)
    for x_t in torch.randn(3, 8, 32):
        hx = cell(x_t, hx, masks=masks)
    assert first(hx).shape == (8, 64)


@pytest.mark.parametrize("name", ["naive", "naive_recurrent", "variational", "zoneout",
                                  "weight_drop", "semeniuta", "awd"])  # fmt: skip
@pytest.mark.parametrize("kind", CELLS)
def test_every_preset_builds_a_cell_whose_plain_call_works(kind, name):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cell = CELLS[kind](I, H, dropout=name)
        dict_cell = CELLS[kind](I, H, dropout={"preset": name})
    assert cell.dropout == dict_cell.dropout
    assert cell.dropout.output == 0 and cell.dropout.between_layers == 0
    hx = given_state(kind, 3)
    with cell.sequence():
        for x_t in torch.randn(2, 3, I):
            hx = cell(x_t, hx)


def test_a_config_object_is_taken_as_written():
    """An explicit output rate still masks the output (return_output=True), as documented."""
    with pytest.warns(UserWarning, match="between_layers"):
        cell = LSTMCell(I, H, dropout=RD.variational(0.3))
    assert cell.dropout.output == 0.3
    with pytest.raises(ValueError, match="return_output=True"):
        cell(torch.randn(2, I))
    with pytest.warns(UserWarning, match=r"embedding=0\.2 has no effect"):
        LSTMCell(I, H, dropout=RD(embedding=0.2, input=0.1))


# ---- CellMasks: exported, indexable, refreshed row by row (RL) --------------------------------


def test_cellmasks_is_exported():
    from rnndrop.nn.stepcells import CellMasks as Inner

    assert CellMasks is Inner and "CellMasks" in rnndrop.nn.__all__


UNTIED = RD(input=0.3, recurrent=0.3, candidate=0.3, tied=False)


@pytest.mark.parametrize("kind", CELLS)
def test_indexing_keeps_the_rows_and_a_shrinking_batch_runs_on(kind):
    """Rows are independent: the batch without its finished rows, run with masks[alive],
    gives the surviving rows exactly what the full batch gives them."""
    torch.manual_seed(0)
    cell = CELLS[kind](I, H, dropout=UNTIED)
    B = 6
    masks = cell.sample_masks(B)
    xs, hx = torch.randn(4, B, I), given_state(kind, B)
    alive = torch.tensor([True, False, True, True, False, True])
    sub = masks[alive]
    assert sub.batch_size == 4
    assert torch.equal(sub.input, masks.input[:, alive])  # untied (G, B, I)
    assert torch.equal(sub.recurrent, masks.recurrent[:, alive])
    assert torch.equal(sub.candidate, masks.candidate[alive])
    full, part = hx, tuple(s[alive] for s in hx) if kind == "lstm" else hx[alive]
    for x_t in xs:
        full = cell(x_t, full, masks=masks)
        part = cell(x_t[alive], part, masks=sub)
    assert torch.equal(first(part), first(full)[alive])
    # other index forms
    assert masks[1].batch_size == 1 and torch.equal(masks[1].candidate, masks.candidate[1:2])
    assert torch.equal(masks[2:4].candidate, masks.candidate[2:4])
    assert torch.equal(masks[[5, 0]].candidate, masks.candidate[[5, 0]])


def test_indexing_keeps_masks_shared_by_the_batch_whole():
    cell = LSTMCell(I, H, dropout=RD(input=0.3, recurrent=0.3, weight_hh=0.3, batch="per_batch"))
    masks = cell.sample_masks(5)
    sub = masks[torch.tensor([0, 3])]
    assert sub.batch_size == 2
    assert torch.equal(sub.input, masks.input) and sub.input.shape[-2] == 1
    assert sub.weight_hh is masks.weight_hh
    cell(torch.randn(2, I), given_state("lstm", 2), masks=sub)


def _keep_rate(m, p):
    """Fraction of a mask's entries kept (inverted scaling: kept entries are 1/(1-p))."""
    return (m != 0).double().mean().item()


@pytest.mark.parametrize("kind", CELLS)
def test_row_wise_refresh_keeps_unfinished_rows_and_redraws_finished_ones(kind):
    torch.manual_seed(1234)
    p, B, Hs = 0.3, 64, 64
    cell = CELLS[kind](I, Hs, dropout=RD(input=p, recurrent=p, candidate=p, tied=False))
    old = cell.sample_masks(B)
    done = torch.rand(B) < 0.5
    n_done = int(done.sum())
    assert 10 < n_done < B - 10
    new = cell.sample_masks(B, keep=old, redraw=done)
    assert new.batch_size == B
    for site, m in new.items():
        o = getattr(old, site)
        assert torch.equal(m[..., ~done, :], o[..., ~done, :]), site  # kept exactly
        fresh = m[..., done, :]
        # every finished row has a new mask (equal by chance: probability ~0.7^64 per row)
        changed = (fresh != o[..., done, :]).movedim(-2, 0).reshape(n_done, -1)
        assert changed.any(-1).all(), site
        # the keep rate of the new draws: binomial, n = their entries, 5 standard deviations
        n = fresh.numel()
        tol = 5 * math.sqrt(p * (1 - p) / n)
        assert abs(_keep_rate(fresh, p) - (1 - p)) < tol, (site, n, tol)
        values = fresh.unique()
        assert len(values) == 2 and values[0] == 0
        assert values[1].item() == pytest.approx(1 / (1 - p), rel=1e-4)
    nobody = torch.zeros(B, dtype=torch.bool)
    assert torch.equal(cell.sample_masks(B, keep=old, redraw=nobody).input, old.input)


@pytest.mark.parametrize("kind", CELLS)
def test_recurrent_policy_pattern(kind):
    """The README's pattern: per-row episode ends, masks refreshed row-wise, states reset.
    A row's masks change exactly when its episode ends."""
    torch.manual_seed(7)
    B, T = 8, 12
    cell = CELLS[kind](I, H, dropout=RD(input=0.2, recurrent=0.2))
    cell.record_masks = True
    hx = zeros_state(kind, B)
    masks = cell.sample_masks(B)
    prev = None
    ends = torch.rand(T, B) < 0.25
    for t in range(T):
        hx = cell(torch.randn(B, I), hx, masks=masks)
        rec = cell.last_masks["recurrent/l0"][0, 0]  # (B, H)
        if prev is not None:
            same = (rec == prev).all(-1)
            assert torch.equal(same | ends[t - 1], torch.ones(B, dtype=torch.bool))
            assert not (same & ends[t - 1]).any()
        prev = rec
        done = ends[t]
        masks = cell.sample_masks(B, keep=masks, redraw=done)
        keep = (~done).unsqueeze(-1).to(first(hx).dtype)
        hx = tuple(s * keep for s in hx) if kind == "lstm" else hx * keep


def test_partial_refresh_of_a_batch_shared_mask_is_refused():
    cell = LSTMCell(I, H, dropout=RD(recurrent=0.3, weight_hh=0.3))
    masks = cell.sample_masks(4)
    done = torch.tensor([True, False, False, True])
    with pytest.raises(ValueError, match="'weight_hh' mask is shared by the whole batch"):
        cell.sample_masks(4, keep=masks, redraw=done)
    everything = cell.sample_masks(4, keep=masks, redraw=torch.ones(4, dtype=torch.bool))
    assert not torch.equal(everything.weight_hh, masks.weight_hh)
    assert not torch.equal(everything.recurrent, masks.recurrent)


def test_refresh_argument_checks():
    cell = LSTMCell(I, H, dropout=VARIATIONAL)
    masks = cell.sample_masks(4)
    with pytest.raises(ValueError, match="keep= and redraw= together"):
        cell.sample_masks(4, keep=masks)
    with pytest.raises(ValueError, match="batch size 4, not 5"):
        cell.sample_masks(5, keep=masks, redraw=[0])
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        cell.sample_masks(4, keep=masks, redraw=torch.ones(3, dtype=torch.bool))
