"""Statistical properties of the masks: rates, sharing over time and batch, gates, expectation.

Fixed seeds; every tolerance is Z standard errors of the quantity estimated, with the
sample size of that test (Z = 5: a false alarm about once in 3.5 million runs).
"""

import math

import pytest
import torch

from rnndrop import functional as F
from rnndrop.config import RecurrentDropout as RD
from rnndrop.nn import GRU, LSTM

Z = 5.0


def within_rate(mask: torch.Tensor, p: float, n_indep: int | None = None) -> None:
    """Observed drop fraction of ``mask`` is p within Z binomial standard errors."""
    dropped = (mask == 0).double().mean().item()
    n = n_indep or mask.numel()
    tol = Z * math.sqrt(p * (1 - p) / n)
    assert abs(dropped - p) < tol, f"drop rate {dropped:.4f}, expected {p} ± {tol:.4f}"


SITES = {  # scheme -> recorded mask names to check
    "input": (RD(input=0.3, time="per_step"), ["input/l0"]),
    "between": (RD(between_layers=0.3, time="per_step"), ["between_layers/l1"]),
    "recurrent": (RD(recurrent=0.3, time="per_step"), ["recurrent/l0", "recurrent/l1"]),
    "output": (RD(output=0.3, time="per_step"), ["output"]),
    "candidate": (RD(candidate=0.3, time="per_step"), ["candidate/l0"]),
    "weight_hh": (RD(weight_hh=0.3), ["weight_hh/l0", "weight_hh/l1"]),
    "zoneout_hidden": (RD(zoneout_hidden=0.3), ["zoneout_hidden/l0"]),
    "zoneout_cell": (RD(zoneout_cell=0.3), ["zoneout_cell/l1"]),
}


CELLS = {"LSTM": LSTM, "GRU": GRU}
# every site of the table for the LSTM; the GRU has no cell state, so no zoneout_cell
BY_CELL = [("LSTM", s) for s in SITES] + [("GRU", s) for s in SITES if s != "zoneout_cell"]


@pytest.mark.parametrize("cell,site", BY_CELL)
def test_observed_rate_per_site(cell, site):
    cfg, names = SITES[site]
    lstm = CELLS[cell](40, 50, 2, dropout=cfg)
    lstm.record_masks = True
    lstm(torch.randn(30, 16, 40))
    for name in names:
        m = lstm.last_masks[name]
        if site.startswith("zoneout"):  # d = 1 means "keep previous": P(d = 1) = z
            within_rate(1 - m, 0.3)  # zeros of 1 - d are where d = 1
            assert set(m.unique().tolist()) <= {0.0, 1.0}
        else:
            within_rate(m, 0.3)
            keep = F.keep_probability(0.3)
            assert torch.allclose(m[m != 0], torch.tensor(1 / keep))  # inverted scaling


def test_classic_scaling_masks_are_zero_one():
    lstm = LSTM(20, 30, dropout=RD(input=0.4, output=0.4, scaling="classic"))
    lstm.record_masks = True
    lstm(torch.randn(10, 8, 20))
    for m in lstm.last_masks.values():
        assert set(m.unique().tolist()) == {0.0, 1.0}


@pytest.mark.parametrize("time", ["per_step", "per_sequence"])
@pytest.mark.parametrize("batch", ["per_sample", "per_batch"])
def test_output_mask_sharing_seen_in_the_output(time, batch):
    """Read the mask off the module's output: out / pre over (T, B, F)."""
    lstm = LSTM(8, 64, dropout=RD(output=0.5, time=time, batch=batch))
    out, _, pre = lstm(torch.randn(12, 6, 8), return_pre_dropout=True)
    m = out / pre
    same_over_time = bool((m == m[:1]).all())
    same_over_batch = bool((m == m[:, :1]).all())
    assert same_over_time == (time == "per_sequence")
    assert same_over_batch == (batch == "per_batch")


@pytest.mark.parametrize("time", ["per_step", "per_sequence"])
@pytest.mark.parametrize("batch", ["per_sample", "per_batch"])
@pytest.mark.parametrize("site", ["input/l0", "recurrent/l0", "candidate/l0"])
@pytest.mark.parametrize("cell", CELLS)
def test_recorded_masks_follow_the_policy(cell, site, time, batch):
    cfg = RD(input=0.5, recurrent=0.5, candidate=0.5, time=time, batch=batch)
    lstm = CELLS[cell](8, 64, dropout=cfg)
    lstm.record_masks = True
    T, B = 12, 6
    lstm(torch.randn(T, B, 8))
    m = lstm.last_masks[site]
    time_dim, batch_dim = 0, (2 if site.startswith("recurrent") else 1)
    assert m.shape[time_dim] == (T if time == "per_step" else 1)
    assert m.shape[batch_dim] == (B if batch == "per_sample" else 1)
    if time == "per_step":  # fresh masks do differ between steps
        assert not torch.equal(m[0], m[1])
    if batch == "per_sample":
        assert not torch.equal(m.select(batch_dim, 0), m.select(batch_dim, 1))


@pytest.mark.parametrize("cell,G", [("LSTM", 4), ("GRU", 3)])
def test_untied_masks_differ_per_gate_and_have_the_rate(cell, G):
    lstm = CELLS[cell](30, 40, dropout=RD(input=0.3, recurrent=0.3, tied=False))
    lstm.record_masks = True
    lstm(torch.randn(5, 16, 30))
    for name in ("input/l0", "recurrent/l0"):
        m = lstm.last_masks[name]
        gates = m if name.startswith("input") else m.transpose(0, 1)  # gate dim first
        assert gates.shape[0] == G
        for a in range(G):
            within_rate(gates[a], 0.3)
            for b in range(a + 1, G):
                assert not torch.equal(gates[a], gates[b])
                # independent: the two gates agree as often as independent coins do
                agree = ((gates[a] == 0) == (gates[b] == 0)).double().mean().item()
                q = 0.3**2 + 0.7**2
                assert abs(agree - q) < Z * math.sqrt(q * (1 - q) / gates[a].numel())


@pytest.mark.parametrize("cell", CELLS)
def test_tied_masks_are_one_for_all_gates(cell):
    lstm = CELLS[cell](30, 40, dropout=RD(recurrent=0.3))
    lstm.record_masks = True
    lstm(torch.randn(5, 4, 30))
    assert lstm.last_masks["recurrent/l0"].shape[1] == 1


@pytest.mark.parametrize("cell", CELLS)
def test_masks_are_fresh_each_call_and_reproducible_by_seed(cell):
    lstm = CELLS[cell](8, 16, dropout=RD.variational(0.5))
    lstm.record_masks = True
    x = torch.randn(4, 3, 8)
    torch.manual_seed(11)
    lstm(x)
    first = dict(lstm.last_masks)
    lstm(x)
    assert not torch.equal(first["recurrent/l0"], lstm.last_masks["recurrent/l0"])
    torch.manual_seed(11)
    lstm(x)
    assert all(torch.equal(first[k], lstm.last_masks[k]) for k in first)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_bernoulli_mask_rate_and_expectation(p):
    n = 1 << 20
    m = F.bernoulli_mask((n,), p)
    within_rate(m, p)
    # inverted scaling: E[mask] = 1 exactly in distribution; the sample mean within Z s.e.
    keep = F.keep_probability(p)
    se = math.sqrt((1 - keep) / keep / n)
    assert abs(m.double().mean().item() - 1) < Z * se


def test_bernoulli_mask_bits_do_not_depend_on_backend():
    from rnndrop.kernels.cpp import build as _ext

    ext = _ext.load()
    if ext is None:
        pytest.skip("no compiled kernel")
    for n, p in [(1, 0.5), (7, 0.3), (4097, 0.25), (10_000, 0.9)]:
        seed, thr = 123456789 * n, int(F.keep_probability(p) * 65536) - 32768
        a = F._mask_bits(n, seed, thr, torch.device("cpu")).float()
        b = ext.bernoulli_mask(n, seed, thr, 1.0, False)
        assert torch.equal(a, b)


def test_bernoulli_mask_independent_bits():
    """Neighbouring elements (same 64-bit word and adjacent words) are uncorrelated."""
    n = 1 << 20
    m = (F.bernoulli_mask((n,), 0.5, scale=False) * 2 - 1).double()
    for lag in (1, 2, 3, 4, 5):
        corr = (m[:-lag] * m[lag:]).mean().item()
        assert abs(corr) < Z / math.sqrt(n)


def test_expectation_preserved_for_every_inverted_site():
    """Mean over many masked outputs ≈ the unmasked output (output site, linear in the mask)."""
    lstm = LSTM(6, 10, dropout=RD(output=0.4, time="per_step"))
    x = torch.randn(3, 2, 6)
    N = 4000
    with torch.no_grad():
        _, _, pre = lstm(x, return_pre_dropout=True)
        outs = torch.stack([lstm(x)[0] for _ in range(N)]).double()
    keep = F.keep_probability(0.4)
    se = pre.double().abs() * math.sqrt((1 - keep) / keep / N)
    assert ((outs.mean(0) - pre.double()).abs() <= Z * se + 1e-12).all()
