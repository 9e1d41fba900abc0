import math

import pytest
import torch
from torch.utils.data import DataLoader

from rnndrop.data.synthetic import (
    AddingTask,
    AssociativeRecall,
    CopyTask,
    DelayedRecall,
    make_task,
)


def stack(task, n=None):
    items = [task[i] for i in range(n or len(task))]
    return torch.stack([x for x, _ in items]), torch.stack([y for _, y in items])


# definitions, checked against hand-built sequences -----------------------------------------
def test_copy_layout():
    task = CopyTask(3, n_symbols=8, n_copy=2, size=50)
    assert (task.seq_len, task.vocab_size, task.num_classes) == (7, 10, 9)
    for i in range(50):
        x, y = task[i]
        a, b = x[:2].tolist()
        assert 1 <= a <= 8 and 1 <= b <= 8
        assert x.tolist() == [a, b, 0, 0, 9, 0, 0]  # T-1 = 2 blanks, delimiter, 2 blanks
        assert y.tolist() == [0, 0, 0, 0, 0, a, b]  # T + K = 5 blanks, then the symbols


def test_adding_layout_and_target():
    for markers in ("halves", "anywhere"):
        x, y = stack(AddingTask(10, markers=markers, size=200))
        assert x.shape == (200, 10, 2) and y.shape == (200,) and y.dtype == torch.float32
        assert ((x[..., 0] >= 0) & (x[..., 0] < 1)).all()
        assert (x[..., 1].sum(1) == 2).all() and ((x[..., 1] == 0) | (x[..., 1] == 1)).all()
        assert torch.allclose(y, (x[..., 0] * x[..., 1]).sum(1))
        if markers == "halves":
            assert (x[:, :5, 1].sum(1) == 1).all() and (x[:, 5:, 1].sum(1) == 1).all()
    x, _ = stack(AddingTask(10, markers="anywhere", size=400))
    assert (x[:, :5, 1].sum(1) == 2).any()  # both markers in one half happens


def test_delayed_recall_layout():
    task = DelayedRecall(4, n_symbols=5, length=12, size=20)
    x, y = stack(task)
    assert x.shape == y.shape == (20, 12) and x.max() < 5
    assert (y[:, :4] == -100).all() and torch.equal(y[:, 4:], x[:, :-4])
    d = task.distance_of(x)
    assert (d[:, :4] == 0).all() and (d[:, 4:] == 4).all()


def test_delayed_recall_cued():
    dists = [3, 8]
    task = DelayedRecall(dists, n_symbols=6, length=60, cue_rate=0.3, size=30)
    assert task.vocab_size == 8 and task.num_classes == 6 and task.distance == 8
    n_cues = 0
    for i in range(30):
        x, y = task[i]
        d = task.distance_of(x)
        for t in range(60):
            if x[t] >= 6:  # a cue: ask for the data token d_k steps back
                k = int(x[t]) - 6
                assert d[t] == dists[k] and t >= dists[k]
                assert x[t - dists[k]] < 6 and y[t] == x[t - dists[k]]
                n_cues += 1
            else:
                assert y[t] == -100 and d[t] == 0
    assert 0.15 * 30 * 60 < n_cues < 0.3 * 30 * 60


def test_associative_recall_layout():
    task = AssociativeRecall(4, n_keys=6, n_values=3, size=100)
    assert (task.seq_len, task.vocab_size, task.num_classes) == (10, 10, 3)
    for i in range(100):
        x, y = task[i]
        keys, values = x[0:8:2].tolist(), x[1:8:2].tolist()
        assert len(set(keys)) == 4 and all(0 <= k < 6 for k in keys)
        assert all(6 <= v < 9 for v in values) and x[8] == 9
        q = int(x[9])
        assert y.dim() == 0 and y == values[keys.index(q)] - 6


# memoryless baselines, measured ---------------------------------------------------------------
def positional_ce(train, test, num_classes):
    """Held-out cross-entropy of the best predictor that knows only the position."""
    counts = torch.stack(
        [torch.bincount(c[c >= 0], minlength=num_classes) for c in train.T]
    ).double()
    logq = (counts + 0.5).log() - (counts + 0.5).sum(1, keepdim=True).log()  # (T, C)
    mask = test != -100
    ll = logq.gather(1, test.clamp(min=0).T).T  # (n, T)
    per_seq = -(ll * mask).sum(1) / mask.sum(1)
    return per_seq.mean().item(), per_seq.std().item() / math.sqrt(len(per_seq))


@pytest.mark.parametrize(
    ("task_fn", "expected"),
    [
        (lambda **k: CopyTask(30, **k), 10 * math.log(8) / (30 + 20)),
        (lambda **k: DelayedRecall(5, length=25, **k), math.log(8)),
        (lambda **k: AssociativeRecall(5, **k), math.log(10)),
    ],
)
def test_memoryless_cross_entropy(task_fn, expected):
    train, test = task_fn(size=3000, split="train"), task_fn(size=3000, split="test")
    assert train.baseline_loss == pytest.approx(expected, rel=1e-12)
    ytr, yte = stack(train)[1], stack(test)[1]
    if ytr.dim() == 1:  # target "last": one class per sequence
        ytr, yte = ytr[:, None], yte[:, None]
    ce, se = positional_ce(ytr, yte, train.num_classes)
    # tolerance: 4 standard errors plus the plug-in estimator's bias, ~C/(2n) nats
    assert abs(ce - expected) < 4 * se + train.num_classes / (2 * 3000) + 1e-3


@pytest.mark.parametrize("markers", ["halves", "anywhere"])
def test_adding_baselines(markers):
    n, t = 4000, 6
    train = AddingTask(t, markers=markers, size=n, split="train")
    x, y = stack(AddingTask(t, markers=markers, size=n, split="test"))
    assert train.baseline_loss == 1 / 6
    # best constant: the training mean (~1); MSE Var(u1 + u2) = 1/6, sd of the squared error
    # is sqrt(E z^4 - 1/36) = sqrt(7/180) for z triangular on [-1, 1]
    se = math.sqrt(7 / 180 / n)
    mse = ((y - stack(train)[1].mean()) ** 2).mean().item()
    assert abs(mse - 1 / 6) < 4 * se + 1e-3
    # seeing only the last step: marked with probability 2/T -> 1/6 - 1/(6T)
    last = torch.where(x[:, -1, 1] == 1, x[:, -1, 0] + 0.5, torch.ones(n))
    mse_last = ((y - last) ** 2).mean().item()
    assert abs(mse_last - (1 / 6 - 1 / (6 * t))) < 4 * se


# determinism ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["copy", "adding", "delayed_recall", "associative_recall"])
def test_same_seed_same_data(name):
    a = make_task(name, 12, size=8, seed=1)
    b = make_task(name, 12, size=8, seed=1)
    for i in reversed(range(8)):  # access order does not matter
        assert all(torch.equal(u, v) for u, v in zip(a[i], b[i], strict=True))
    other_seed = make_task(name, 12, size=8, seed=2)
    other_split = make_task(name, 12, size=8, seed=1, split="val")
    assert not torch.equal(stack(a)[0], stack(other_seed)[0])
    assert not torch.equal(stack(a)[0], stack(other_split)[0])


def test_same_batches_with_any_worker_count():
    task = DelayedRecall([2, 5], n_symbols=4, length=16, size=24, seed=5)

    def batches(workers):
        loader = DataLoader(task, batch_size=5, num_workers=workers)
        return [(x.clone(), y.clone()) for x, y in loader]

    zero, two = batches(0), batches(2)
    assert len(zero) == len(two) == 5
    for (x0, y0), (x2, y2) in zip(zero, two, strict=True):
        assert torch.equal(x0, x2) and torch.equal(y0, y2)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: CopyTask(0), "distance must be an integer >= 1"),
        (lambda: AddingTask(1), "distance must be an integer >= 2"),
        (lambda: AddingTask(10, markers="ends"), "markers must be"),
        (lambda: DelayedRecall(10, length=10), r"length \(10\) must exceed"),
        (lambda: AssociativeRecall(8, n_keys=4), r"n_keys \(4\) must be >="),
        (lambda: CopyTask(5, size=0), "size must be"),
        (lambda: make_task("parity", 3), "unknown task 'parity'"),
    ],
)
def test_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_index_bounds():
    task = CopyTask(5, size=3)
    assert torch.equal(task[-1][0], task[2][0])
    with pytest.raises(IndexError):
        task[3]
