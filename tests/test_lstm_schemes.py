"""Every scheme and policy, on both paths and loop implementations, against tests/reference.py.

The module records the masks it drew; the reference applies the same masks by the book
(README.md, "The schemes"; the step equations in rnndrop/nn/cells/lstm.py). Agreement of
outputs *and* gradients shows each mask acts at its site with the documented equation, and
that the hand-written backward is right.
"""

import itertools

import pytest
import torch
from compare import assert_matches_reference
from reference import reference_lstm

from rnndrop.config import RecurrentDropout as RD
from rnndrop.nn import LSTM, mc_dropout
from rnndrop.nn.masks import needs_loop

SCHEMES = {
    "naive": RD.naive(0.3),
    "naive_recurrent": RD.naive_recurrent(0.3),
    "variational": RD.variational(0.3),
    "variational_untied": RD.variational(0.3, tied=False),
    "variational_per_batch": RD.variational(0.3).replace(batch="per_batch"),
    "untied_per_batch": RD.variational(0.3, tied=False).replace(batch="per_batch"),
    "recurrent_per_step_per_batch": RD(recurrent=0.3, time="per_step", batch="per_batch"),
    "zoneout": RD.zoneout(0.2, 0.4),
    "weight_drop": RD.weight_drop(0.4),
    "semeniuta": RD.semeniuta(0.3),
    "semeniuta_per_sequence": RD.semeniuta(0.3, time="per_sequence"),
    "awd": RD.awd(0.0, 0.3, 0.2, 0.25, 0.4),
    "everything": RD(
        input=0.2,
        between_layers=0.2,
        recurrent=0.2,
        output=0.2,
        candidate=0.2,
        weight_hh=0.2,
        zoneout_hidden=0.1,
        zoneout_cell=0.1,
        tied=False,
    ),
    "classic": RD(
        input=0.2,
        between_layers=0.2,
        recurrent=0.2,
        output=0.3,
        weight_hh=0.2,
        candidate=0.2,
        scaling="classic",
    ),
}

F64 = torch.float64


def check(lstm, x, hx, sample, tol=1e-10):
    assert_matches_reference(lstm, reference_lstm, x, hx, sample, tol)


def make(scheme, layers=2, bidir=False, H=6, I=4):
    return LSTM(I, H, layers, bidirectional=bidir, dropout=SCHEMES[scheme]).to(F64)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("bidir,with_hx", list(itertools.product([False, True], [False, True])))
def test_training_matches_reference(scheme, bidir, with_hx, loop_impl):
    torch.manual_seed(1)
    lstm = make(scheme, bidir=bidir)
    x = torch.randn(5, 3, 4, dtype=F64, requires_grad=True)
    D = 2 if bidir else 1
    hx = None
    if with_hx:
        hx = tuple(torch.randn(2 * D, 3, 6, dtype=F64, requires_grad=True) for _ in range(2))
    check(lstm, x, hx, sample=True)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_eval_matches_reference_expectations(scheme, loop_impl):
    lstm = make(scheme, bidir=True).eval()
    x = torch.randn(5, 3, 4, dtype=F64, requires_grad=True)
    check(lstm, x, None, sample=False)
    assert lstm.last_masks == {}  # no mask is drawn in eval


@pytest.mark.parametrize("scheme", ["variational", "zoneout", "awd", "everything"])
def test_mc_mode_matches_reference_with_its_masks(scheme, loop_impl):
    lstm = make(scheme).eval()
    x = torch.randn(5, 3, 4, dtype=F64, requires_grad=True)
    with mc_dropout(lstm):
        check(lstm, x, None, sample=True)
    assert lstm.mc is False and not lstm.training


@pytest.mark.parametrize("scheme", ["variational", "zoneout", "everything", "semeniuta"])
def test_compiled_and_python_loops_agree_float32(scheme, monkeypatch):
    from rnndrop.kernels.cpp import build

    if build.load() is None:
        pytest.skip("the compiled kernel is not available here")
    lstm = LSTM(16, 24, 2, bidirectional=True, dropout=SCHEMES[scheme])
    x = torch.randn(12, 5, 16, requires_grad=True)
    results = []
    for impl in ("cpp", "python"):
        monkeypatch.setenv("RNNDROP_LOOP", impl)
        torch.manual_seed(7)
        out, (h, c) = lstm(x)
        grads = torch.autograd.grad((out.sum() + c.sum()), [x, *lstm.parameters()])
        results.append([out, h, c, *grads])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


def test_paths_are_the_documented_ones():
    fused = ["naive", "variational_per_batch", "untied_per_batch", "weight_drop", "awd"]
    for name, cfg in SCHEMES.items():
        loop = any(needs_loop(cfg, layer, True) for layer in (0, 1))
        assert loop == (name not in fused), name
    # in eval only zoneout and classic candidate scaling need the loop
    assert needs_loop(SCHEMES["zoneout"], 0, False)
    assert needs_loop(SCHEMES["classic"], 0, False)
    assert not needs_loop(SCHEMES["variational"], 0, False)


def test_packed_input_with_masks_matches_padded_reference(loop_impl):
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    lstm = make("everything", bidir=True)
    lengths = torch.tensor([5, 3, 2])
    x = torch.randn(5, 3, 4, dtype=F64)
    lstm.record_masks = True
    out, (h, c) = lstm(pack_padded_sequence(x, lengths))
    padded, _ = pad_packed_sequence(out)
    # each sequence alone, through the reference with its slice of the recorded masks
    for b, n in enumerate(lengths.tolist()):
        masks = {k: _slice(v, k, b, n) for k, v in lstm.last_masks.items()}
        ro, (rh, rc), _ = reference_lstm(lstm, x[:n, b : b + 1], None, masks)
        torch.testing.assert_close(padded[:n, b : b + 1], ro, atol=1e-10, rtol=0)
        torch.testing.assert_close(h[:, b : b + 1], rh, atol=1e-10, rtol=0)
        torch.testing.assert_close(c[:, b : b + 1], rc, atol=1e-10, rtol=0)


def _slice(m, key, b, n):
    """The recorded mask restricted to sequence b's first n steps (shapes per masks.py)."""
    if key.startswith("weight_hh"):
        return m
    if key.startswith("recurrent"):
        return m[:n, :, b : b + 1] if m.shape[2] > 1 else m[:n]
    if m.dim() == 4:  # untied input (4, T, B, F)
        return m[:, :n, b : b + 1] if m.shape[2] > 1 else m[:, :n]
    return m[:n, b : b + 1] if m.shape[1] > 1 else m[:n]
