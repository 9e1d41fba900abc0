import math

import pytest
import torch

from rnndrop.data.batching import BPTTBatches, batchify, variable_lengths


def test_batchify_contiguous_rows_remainder_dropped():
    streams = batchify(torch.arange(10), 3)
    assert streams.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    with pytest.raises(ValueError, match="too few for batch_size=6"):
        batchify(torch.arange(10), 6)
    with pytest.raises(ValueError, match="1-D"):
        batchify(torch.zeros(2, 5, dtype=torch.long), 2)


def test_fixed_chunks_hand_example():
    streams = torch.arange(22).view(2, 11)  # N - 1 = 10 input positions: chunks 4, 4, 2
    batches = BPTTBatches(streams, 4)
    assert len(batches) == 3
    chunks = list(batches)
    assert [x.shape for x, _ in chunks] == [(2, 4), (2, 4), (2, 2)]
    x0, y0 = chunks[0]
    assert x0.tolist() == [[0, 1, 2, 3], [11, 12, 13, 14]]
    assert y0.tolist() == [[1, 2, 3, 4], [12, 13, 14, 15]]
    x2, y2 = chunks[2]  # the last, shorter chunk is kept
    assert x2.tolist() == [[8, 9], [19, 20]] and y2.tolist() == [[9, 10], [20, 21]]


@pytest.mark.parametrize("variable", [False, True])
def test_streams_contiguous_across_chunks(variable):
    streams = torch.randint(0, 100, (3, 500))
    chunks = list(BPTTBatches(streams, 20, variable=variable, seed=1))
    assert torch.equal(torch.cat([x for x, _ in chunks], dim=1), streams[:, :-1])
    assert torch.equal(torch.cat([y for _, y in chunks], dim=1), streams[:, 1:])
    assert len(chunks) == len(BPTTBatches(streams, 20, variable=variable, seed=1))


def test_variable_lengths_follow_awd():
    gen = torch.Generator().manual_seed(0)
    lengths = variable_lengths(70 * 4000, 70, gen)
    body = lengths[:-1]  # the last one is cut to the tokens left
    assert sum(lengths) == 70 * 4000 and min(body) >= 5
    n = len(body)
    half = sum(1 for t in body if t < 52) / n  # mean 35 (p=0.05) vs mean 70 (p=0.95)
    assert abs(half - 0.05) < 4 * math.sqrt(0.05 * 0.95 / n)
    full = torch.tensor([t for t in body if t >= 52], dtype=torch.float64)
    # int() truncates N(70, 5) toward zero: mean 69.5 on average, std ~5
    assert abs(full.mean().item() - 69.5) < 4 * 5 / math.sqrt(len(full)) + 0.05
    assert 4.5 < full.std().item() < 5.5
    capped = variable_lengths(1000, 70, torch.Generator().manual_seed(0), max_len=72)
    assert max(capped) <= 72


def test_variable_deterministic_per_seed_and_epoch():
    streams = torch.arange(2 * 2000).view(2, 2000)
    a = BPTTBatches(streams, 30, variable=True, seed=3)
    b = BPTTBatches(streams, 30, variable=True, seed=3)
    first = [x.shape[1] for x, _ in a]
    assert first == [x.shape[1] for x, _ in b]
    second = [x.shape[1] for x, _ in a]  # iterating again is the next epoch
    assert second != first and sum(second) == sum(first) == 1999
    assert [x.shape[1] for x, _ in BPTTBatches(streams, 30, variable=True, seed=4)] != first
    fixed = BPTTBatches(streams, 30)
    assert [x.tolist() for x, _ in fixed] == [x.tolist() for x, _ in fixed]


@pytest.mark.parametrize("variable", [False, True])
def test_resume_mid_epoch(variable):
    streams = torch.randint(0, 50, (4, 900))
    ref = BPTTBatches(streams, 25, variable=variable, seed=7)
    list(ref)  # epoch 0
    expected = list(ref)  # epoch 1: what a resumed run must reproduce

    run = BPTTBatches(streams, 25, variable=variable, seed=7)
    list(run)
    it = iter(run)
    seen = [next(it) for _ in range(5)]
    state = run.state_dict()
    assert state["epoch"] == 1 and state["index"] == 5
    assert state["position"] == sum(x.shape[1] for x, _ in seen)

    resumed = BPTTBatches(streams, 25, variable=variable, seed=0)  # seed comes from the state
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert len(seen) + len(rest) == len(expected)
    for (x, y), (ex, ey) in zip(seen + rest, expected, strict=True):
        assert torch.equal(x, ex) and torch.equal(y, ey)
    assert resumed.state_dict()["epoch"] == 2 and resumed.state_dict()["index"] == 0


def test_start_and_state_after_full_pass():
    streams = torch.arange(2 * 41).view(2, 41)
    assert [x[0, 0].item() for x, _ in BPTTBatches(streams, 10, start=2)] == [20, 30]
    b = BPTTBatches(streams, 10)
    it = iter(b)
    for _ in range(4):
        next(it)
    state = b.state_dict()  # saved after the last chunk, before the pass ended
    fresh = BPTTBatches(streams, 10)
    fresh.load_state_dict(state)
    assert [x[0, 0].item() for x, _ in fresh] == [0, 10, 20, 30]  # next epoch, from the start
    assert fresh.state_dict()["epoch"] == state["epoch"] + 2  # epoch 1 ran, 2 is next


def test_broken_off_pass_starts_a_new_epoch():
    streams = torch.arange(2 * 41).view(2, 41)
    b = BPTTBatches(streams, 10, variable=True, seed=0)
    next(iter(b))
    assert b.state_dict()["epoch"] == 0
    list(b)
    assert b.state_dict() == {**b.state_dict(), "epoch": 2, "index": 0}


def test_load_state_dict_rejects_other_shapes():
    b = BPTTBatches(torch.arange(100).view(2, 50), 10)
    with pytest.raises(ValueError, match="saved bptt=20 but this loader has bptt=10"):
        b.load_state_dict({**b.state_dict(), "bptt": 20})


def test_ddp_split_rows_by_rank():
    streams = torch.arange(4 * 30).view(4, 30)
    ranks = [BPTTBatches(streams, 8, rank=r, world_size=2) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == len(BPTTBatches(streams, 8))
    for (x0, y0), (x1, y1), (x, y) in zip(*ranks, BPTTBatches(streams, 8), strict=True):
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)
    assert ranks[1].streams[:, 0].tolist() == [60, 90]
    with pytest.raises(ValueError, match="3 streams cannot be split evenly over world_size=2"):
        BPTTBatches(torch.zeros(3, 10, dtype=torch.long), 4, world_size=2)
    with pytest.raises(ValueError, match="rank"):
        BPTTBatches(streams, 4, rank=2, world_size=2)
