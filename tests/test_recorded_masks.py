"""``last_masks`` as a user finds it: deep-copyable after a concrete training forward, and in
the caller's batch order for unsorted packed input (issue 20, section 4)."""

import copy

import pytest
import torch
from reference import reference_gru, reference_lstm
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from rnndrop.config import RecurrentDropout as RD
from rnndrop.nn import GRU, LSTM

F64 = torch.float64


@pytest.mark.parametrize("cls", [LSTM, GRU])
def test_concrete_training_forward_records_detached_masks_and_deepcopies(cls):
    zone = {"zoneout_hidden": 0.1} if cls is GRU else {"zoneout_cell": 0.1}
    cfg = RD(input=0.2, recurrent=0.3, output=0.2, weight_hh=0.2, concrete=True, **zone)
    m = cls(3, 8, num_layers=2, dropout=cfg)
    m.record_masks = True
    out, _ = m(torch.randn(5, 2, 3))
    assert m.last_masks, "a training forward draws masks"
    for name, mask in m.last_masks.items():
        assert mask.grad_fn is None and not mask.requires_grad, name
    twin = copy.deepcopy(m)  # raised "Only Tensors created explicitly by the user ..." before
    assert set(twin.last_masks) == set(m.last_masks)
    for name, mask in m.last_masks.items():
        assert torch.equal(twin.last_masks[name], mask), name
    out.sum().backward()  # recording changed nothing in the graph the loss uses
    assert all(p.grad is not None for n, p in m.named_parameters() if "logit" in n)


def _slice(m, key, b, n):
    """Recorded mask of caller's sequence ``b``, first ``n`` steps (layouts of masks.py)."""
    if key.startswith("weight_hh"):
        return m
    if key.startswith("recurrent"):
        return m[:n, :, b : b + 1] if m.shape[2] > 1 else m[:n]
    if m.dim() == 4:  # untied input (G, T, B, F)
        return m[:, :n, b : b + 1] if m.shape[2] > 1 else m[:, :n]
    return m[:n, b : b + 1] if m.shape[1] > 1 else m[:n]


EVERYTHING = {
    "lstm": RD(input=0.3, between_layers=0.2, recurrent=0.3, output=0.2, candidate=0.2,
               zoneout_hidden=0.2, zoneout_cell=0.2, tied=False),
    "gru": RD(input=0.3, between_layers=0.2, recurrent=0.3, output=0.2, candidate=0.2,
              zoneout_hidden=0.2, tied=False),
}  # fmt: skip


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_unsorted_packed_input_records_masks_in_the_callers_order(kind):
    """Each caller's row, run alone through the reference with the row of the recorded
    masks at its own index, gives that row's output: the record is in the caller's order."""
    torch.manual_seed(0)
    cls, reference = (LSTM, reference_lstm) if kind == "lstm" else (GRU, reference_gru)
    m = cls(4, 6, num_layers=2, dropout=EVERYTHING[kind], dtype=F64)
    m.record_masks = True
    lengths = torch.tensor([2, 5, 3])  # not sorted: the packed batch is permuted inside
    x = torch.randn(5, 3, 4, dtype=F64)
    out, state = m(pack_padded_sequence(x, lengths, enforce_sorted=False))
    padded, _ = pad_packed_sequence(out)
    h = state[0] if kind == "lstm" else state
    for b, n in enumerate(lengths.tolist()):
        masks = {k: _slice(v, k, b, n) for k, v in m.last_masks.items()}
        ro, rs, _ = reference(m, x[:n, b : b + 1], None, masks)
        torch.testing.assert_close(padded[:n, b : b + 1], ro, atol=1e-10, rtol=0)
        rh = rs[0] if kind == "lstm" else rs
        torch.testing.assert_close(h[:, b : b + 1], rh, atol=1e-10, rtol=0)


def test_unsorted_packed_record_rows_follow_the_rows_they_masked():
    """Output dropout only: the recorded output mask's zeros are where the caller's output
    rows are zero."""
    m = LSTM(3, 64, dropout=RD(output=0.5))
    m.record_masks = True
    lengths = torch.tensor([1, 4, 2, 3])
    x = torch.randn(4, 4, 3)
    out, _ = m(pack_padded_sequence(x, lengths, enforce_sorted=False))
    padded, _ = pad_packed_sequence(out)  # caller's order
    mask = m.last_masks["output"]  # (1, B, H): per sequence
    for b, n in enumerate(lengths.tolist()):
        assert torch.equal(padded[:n, b] == 0, (mask[0, b] == 0).expand(n, -1)), b
