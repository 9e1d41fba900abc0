"""Exact dropout ensembles and their Monte Carlo estimates (rnndrop.analysis.ensembles)."""

import itertools
import math

import pytest
import torch

from rnndrop.analysis import (
    Ensemble,
    categorical_kl,
    exact_ensemble,
    mc_aggregate,
    mc_convergence,
    mc_predict,
)
from rnndrop.analysis.ensembles import MAX_EXACT_UNITS
from rnndrop.functional import bernoulli_mask

D = torch.float64


def _linear(n, c, seed):
    g = torch.Generator().manual_seed(seed)
    w, b = torch.randn(n, c, generator=g, dtype=D), torch.randn(c, generator=g, dtype=D)
    return lambda x: x @ w + b


def _mlp(n, c, seed, hidden=16):
    g = torch.Generator().manual_seed(seed)
    w1 = 1.5 * torch.randn(n, hidden, generator=g, dtype=D)
    w2 = 1.5 * torch.randn(hidden, c, generator=g, dtype=D)
    return lambda x: torch.tanh(x @ w1) @ w2


def _brute_force(f, h, p):
    """A second enumeration: one pattern at a time, over itertools.product, weights by hand."""
    n = h.shape[1]
    arith, logmean = 0.0, 0.0
    for pattern in itertools.product((0, 1), repeat=n):
        prob = math.prod((1 - p) if kept else p for kept in pattern)
        mask = torch.tensor([kept / (1 - p) for kept in pattern], dtype=D)
        logits = torch.stack([f((row * mask)[None])[0] for row in h])
        arith = arith + prob * torch.softmax(logits, -1)
        logmean = logmean + prob * torch.log_softmax(logits, -1)
    geo = torch.exp(logmean)
    return arith, geo / geo.sum(-1, keepdim=True), torch.softmax(f(h), -1)


@pytest.mark.parametrize("n", [1, 4, 10])
@pytest.mark.parametrize("p", [0.1, 0.3, 0.5, 0.8])
def test_geometric_equals_weight_scaling_for_linear_f(n, p):
    h = torch.randn(6, n, dtype=D)
    e = exact_ensemble(_linear(n, 5, seed=n), h, p)
    assert isinstance(e, Ensemble)
    torch.testing.assert_close(e.geometric, e.scaled, rtol=0, atol=1e-12)
    torch.testing.assert_close(e.arithmetic.sum(-1), torch.ones(6, dtype=D))
    # and the identity is not vacuous: the arithmetic ensemble differs from both
    assert (e.arithmetic - e.scaled).abs().max() > 1e-3


@pytest.mark.parametrize("p", [0.2, 0.5])
def test_identity_fails_for_nonlinear_f(p):
    h = torch.randn(8, 6, dtype=D)
    e = exact_ensemble(_mlp(6, 4, seed=1), h, p)
    gap = (e.geometric - e.scaled).abs().max()
    assert gap > 1e-2, f"geometric == scaled to {gap:.2e} for a tanh hidden layer"
    assert float(categorical_kl(e.geometric, e.scaled).mean()) > 1e-4


@pytest.mark.parametrize("f_kind", ["linear", "mlp"])
@pytest.mark.parametrize("n,p", [(1, 0.5), (3, 0.25), (6, 0.6)])
def test_matches_independent_enumeration(f_kind, n, p):
    f = _linear(n, 3, seed=2) if f_kind == "linear" else _mlp(n, 3, seed=2)
    h = torch.randn(3, n, dtype=D)
    got = exact_ensemble(f, h, p)
    want = _brute_force(f, h, p)
    for name, a, b in zip(Ensemble._fields, got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)


def test_chunking_does_not_change_the_result(monkeypatch):
    from rnndrop.analysis import ensembles

    f, h = _mlp(9, 4, seed=3), torch.randn(5, 9, dtype=D)
    whole = exact_ensemble(f, h, 0.4)
    monkeypatch.setattr(ensembles, "_ROWS_PER_CHUNK", 7)  # 1 pattern per call
    for a, b in zip(whole, exact_ensemble(f, h, 0.4), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_rate_zero_is_the_single_network():
    f, h = _mlp(5, 3, seed=4), torch.randn(4, 5, dtype=D)
    e = exact_ensemble(f, h, 0.0)
    for t in e:
        torch.testing.assert_close(t, e.scaled, rtol=0, atol=1e-14)


def test_refuses_too_many_units():
    h = torch.zeros(1, MAX_EXACT_UNITS + 1)
    with pytest.raises(ValueError, match=rf"N={MAX_EXACT_UNITS + 1}.*limit of {MAX_EXACT_UNITS}"):
        exact_ensemble(lambda x: x[:, :2], h, 0.5)
    with pytest.raises(ValueError, match=r"N=5.*limit of 4"):
        exact_ensemble(lambda x: x[:, :2], torch.zeros(1, 5), 0.5, max_units=4)


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"\(B, N\)"):
        exact_ensemble(lambda x: x, torch.zeros(2, 3, 4), 0.5)
    with pytest.raises(ValueError, match="p must be in"):
        exact_ensemble(lambda x: x, torch.zeros(2, 3), 1.0)
    with pytest.raises(ValueError, match="logits"):
        exact_ensemble(lambda x: x.sum(-1), torch.zeros(2, 3), 0.5)


def test_arithmetic_differs_from_geometric():
    h = torch.randn(8, 6, dtype=D)
    for f in (_linear(6, 4, seed=5), _mlp(6, 4, seed=5)):
        e = exact_ensemble(f, h, 0.5)
        assert (e.arithmetic - e.geometric).abs().max() > 1e-2
        # the mixture is the more uncertain of the two (higher entropy), on average
        ent = [float(-(t * t.log()).sum(-1).mean()) for t in (e.arithmetic, e.geometric)]
        assert ent[0] > ent[1]


def test_mc_arithmetic_converges_to_exact():
    n, p, S = 8, 0.4, 20_000
    f, h = _mlp(n, 4, seed=6), torch.randn(3, n, dtype=D)
    exact = exact_ensemble(f, h, p)
    gen = torch.Generator().manual_seed(0)
    masks = bernoulli_mask((S, *h.shape), p, dtype=D, generator=gen)
    logits = f((h * masks).reshape(-1, n)).view(S, *h.shape[:1], -1)
    for how, ref in (("arithmetic", exact.arithmetic), ("geometric", exact.geometric)):
        est = mc_aggregate(logits, how)
        # the estimate is a mean of S draws: 6 standard errors, per entry
        per_draw = logits.softmax(-1) if how == "arithmetic" else logits.log_softmax(-1)
        se = per_draw.std(0) / math.sqrt(S)
        if how == "arithmetic":
            assert ((est - ref).abs() <= 6 * se + 1e-12).all(), (est - ref).abs().max()
        else:  # compare the mean log-probabilities, up to the normalising constant
            diff = est.log() - ref.log()
            diff = diff - diff.mean(-1, keepdim=True)
            assert (diff.abs() <= 12 * se.max(-1, keepdim=True).values).all()
    # a single draw is far off: the tolerance above is not loose enough to pass anything
    one = mc_aggregate(logits[:1], "arithmetic")
    se_max = (logits.softmax(-1).std(0) / math.sqrt(S)).max()
    assert (one - exact.arithmetic).abs().max() > 20 * se_max


def test_mc_convergence_decreases_and_uses_prefixes():
    n, p = 8, 0.5
    f, h = _mlp(n, 4, seed=7), torch.randn(16, n, dtype=D)
    ref = exact_ensemble(f, h, p).arithmetic
    gen = torch.Generator().manual_seed(1)
    masks = bernoulli_mask((400, *h.shape), p, dtype=D, generator=gen)
    logits = f((h * masks).reshape(-1, n)).view(400, 16, -1)
    curve = mc_convergence(logits, ref, (1, 10, 400))
    assert list(curve) == [1, 10, 400]
    assert curve[1] > curve[10] > curve[400] > 0
    assert curve[1] == pytest.approx(float(categorical_kl(ref, logits[0].softmax(-1)).mean()))
    # a callable is drawn max(sample_sizes) times
    calls = []

    def draw():
        calls.append(1)
        return logits[len(calls) - 1]

    assert mc_convergence(draw, ref, (1, 2, 5)) == pytest.approx(
        mc_convergence(logits[:5], ref, (1, 2, 5))
    )
    assert len(calls) == 5
    with pytest.raises(ValueError, match="5 samples given"):
        mc_convergence(logits[:5], ref, (10,))


def test_mc_predict_and_aggregates():
    logits = torch.randn(7, 3, 5, dtype=D)
    it = iter(logits)
    arith = mc_predict(lambda: next(it), 7, "arithmetic")
    torch.testing.assert_close(arith, logits.softmax(-1).mean(0))
    geo = mc_aggregate(logits, "geometric")
    g = logits.log_softmax(-1).mean(0).exp()
    torch.testing.assert_close(geo, g / g.sum(-1, keepdim=True))
    torch.testing.assert_close(mc_aggregate(logits, "geometric", log=True), geo.log())
    torch.testing.assert_close(mc_aggregate(logits, "arithmetic", log=True), arith.log())
    # the sample dimension can be elsewhere
    torch.testing.assert_close(mc_aggregate(logits.transpose(0, 1), dim=1), arith)
    with pytest.raises(ValueError, match="aggregate must be one of"):
        mc_aggregate(logits, "harmonic")
    with pytest.raises(ValueError, match="samples must be"):
        mc_predict(lambda: logits[0], 0)


def test_categorical_kl():
    p = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]])
    q = torch.tensor([[0.25, 0.25, 0.5], [1.0, 0.0, 0.0]])
    torch.testing.assert_close(categorical_kl(p, q), torch.tensor([math.log(2), 0.0], dtype=D))
    assert float(categorical_kl(q, p)[0]) > 100  # mass where p is 0: large, finite
