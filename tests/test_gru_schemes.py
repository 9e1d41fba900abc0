"""Every scheme that means something for a GRU, on both paths and loop implementations,
against the independent GRU of tests/reference.py.

The module records the masks it drew; the reference applies the same masks at their GRU
sites by the book (torch's GRU equations, r, z, n). Agreement of outputs *and* gradients
shows each mask acts at its site with the documented equation (the recurrent mask where
``h_{t-1}`` enters ``W_h*`` and not in the carry ``z ⊙ h_{t-1}``, the candidate mask on
``n``, zoneout on ``h``) and that the hand-written backward is right.
"""

import itertools

import pytest
import torch
from compare import assert_matches_reference
from reference import reference_gru
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from rnndrop.config import RecurrentDropout as RD
from rnndrop.nn import GRU, mc_dropout
from rnndrop.nn.masks import needs_loop

SCHEMES = {
    "naive": RD.naive(0.3),
    "naive_recurrent": RD.naive_recurrent(0.3),
    "variational": RD.variational(0.3),
    "variational_untied": RD.variational(0.3, tied=False),
    "variational_per_batch": RD.variational(0.3).replace(batch="per_batch"),
    "untied_per_batch": RD.variational(0.3, tied=False).replace(batch="per_batch"),
    "recurrent_per_step_per_batch": RD(recurrent=0.3, time="per_step", batch="per_batch"),
    "zoneout": RD.zoneout(hidden=0.2, cell=0.0),
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
        tied=False,
    ),
    # layer 0 runs the loop (untied per-sample input masks), layer 1 the fused op
    "input_untied_only": RD(input=0.3, tied=False),
    # a loop layer with untied per-batch input masks folded into W_ih's columns
    "candidate_untied_folded_input": RD(candidate=0.3, input=0.2, tied=False, batch="per_batch"),
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
LAYER_SITES = ("recurrent", "candidate", "weight_hh", "zoneout_hidden")  # per layer, direction


def expected_keys(cfg, layers, bidir):
    """The recorded mask names a sampled forward of a GRU with ``cfg`` must produce."""
    keys = set()
    if cfg.input:
        keys.add("input/l0")
    if cfg.between_layers and layers > 1:
        keys |= {f"between_layers/l{layer}" for layer in range(1, layers)}
    if cfg.output:
        keys.add("output")
    for site in LAYER_SITES:
        if getattr(cfg, site):
            for layer, d in itertools.product(range(layers), range(2 if bidir else 1)):
                keys.add(f"{site}/l{layer}" + ("_reverse" if d else ""))
    return keys


def check(gru, x, hx, sample, tol=1e-10):
    masks = assert_matches_reference(gru, reference_gru, x, hx, sample, tol)
    if sample:
        assert set(masks) == expected_keys(gru.dropout, gru.num_layers, gru.bidirectional)
        # not vacuous: something is dropped, something kept (small masks may keep all)
        assert any((m == 0).any() for m in masks.values())
        assert all((m != 0).any() for m in masks.values())


def make(scheme, layers=2, bidir=False, H=6, I=4):
    return GRU(I, H, layers, bidirectional=bidir, dropout=SCHEMES[scheme]).to(F64)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("bidir,with_hx", list(itertools.product([False, True], [False, True])))
def test_training_matches_reference(scheme, bidir, with_hx, loop_impl):
    torch.manual_seed(1)
    gru = make(scheme, bidir=bidir)
    x = torch.randn(5, 3, 4, dtype=F64, requires_grad=True)
    D = 2 if bidir else 1
    hx = torch.randn(2 * D, 3, 6, dtype=F64, requires_grad=True) if with_hx else None
    check(gru, x, hx, sample=True)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_eval_matches_reference_expectations(scheme, loop_impl):
    gru = make(scheme, bidir=True).eval()
    x = torch.randn(5, 3, 4, dtype=F64, requires_grad=True)
    hx = torch.randn(4, 3, 6, dtype=F64, requires_grad=True)
    check(gru, x, hx, sample=False)
    assert gru.last_masks == {}  # no mask is drawn in eval


@pytest.mark.parametrize("scheme", ["variational", "zoneout", "awd", "everything"])
def test_mc_mode_matches_reference_with_its_masks(scheme, loop_impl):
    gru = make(scheme).eval()
    x = torch.randn(5, 3, 4, dtype=F64, requires_grad=True)
    with mc_dropout(gru):
        check(gru, x, None, sample=True)
    assert gru.mc is False and not gru.training


def test_without_bias_matches_reference(loop_impl):
    gru = GRU(4, 6, 2, bias=False, bidirectional=True, dropout=SCHEMES["everything"]).to(F64)
    x = torch.randn(5, 3, 4, dtype=F64, requires_grad=True)
    check(gru, x, None, sample=True)


def test_batch_first_matches_reference(loop_impl):
    gru = GRU(4, 6, 2, batch_first=True, dropout=SCHEMES["everything"]).to(F64)
    gru.record_masks = True
    x = torch.randn(3, 5, 4, dtype=F64)
    out, h = gru(x)
    ref_out, rh, _ = reference_gru(gru, x.transpose(0, 1), None, gru.last_masks)
    torch.testing.assert_close(out, ref_out.transpose(0, 1), atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(h, rh, atol=1e-10, rtol=1e-10)


def test_unbatched_input_matches_reference(loop_impl):
    gru = GRU(4, 6, 2, bidirectional=True, dropout=SCHEMES["everything"]).to(F64)
    gru.record_masks = True
    x, h0 = torch.randn(5, 4, dtype=F64), torch.randn(4, 6, dtype=F64)
    out, h = gru(x, h0)
    assert out.shape == (5, 12) and h.shape == (4, 6)
    ref_out, rh, _ = reference_gru(gru, x[:, None], h0[:, None], gru.last_masks)
    torch.testing.assert_close(out, ref_out[:, 0], atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(h, rh[:, 0], atol=1e-10, rtol=1e-10)


def test_recurrent_mask_does_not_touch_the_carry(loop_impl):
    """One step from h0 with a recurrent mask: the carry z ⊙ h0 sees the unmasked h0.

    A module that masked h0 in the carry too would give z ⊙ (m ⊙ h0) where m drops units;
    written out by hand here, independently of the reference."""
    gru = GRU(4, 6, dropout=RD(recurrent=0.5, time="per_step")).to(F64)
    gru.record_masks = True
    x = torch.randn(1, 3, 4, dtype=F64)
    h0 = torch.randn(1, 3, 6, dtype=F64)
    out, h = gru(x, h0)
    m = gru.last_masks["recurrent/l0"]  # (1, 1, 3, 6)
    assert (m == 0).any() and (m != 0).any()
    ref, rh, _ = reference_gru(gru, x, h0, gru.last_masks)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(h, rh, atol=1e-12, rtol=0)
    # and by hand, the carry with the unmasked h0
    w_ih, w_hh = gru.weight_ih_l0, gru.weight_hh_l0
    gx = x[0] @ w_ih.t() + gru.bias_ih_l0
    gh = (h0[0] * m[0, 0]) @ w_hh.t() + gru.bias_hh_l0
    r = torch.sigmoid(gx[:, :6] + gh[:, :6])
    z = torch.sigmoid(gx[:, 6:12] + gh[:, 6:12])
    n = torch.tanh(gx[:, 12:] + r * gh[:, 12:])
    torch.testing.assert_close(h[0], (1 - z) * n + z * h0[0], atol=1e-12, rtol=0)


@pytest.mark.parametrize("scheme", ["variational_untied", "zoneout", "everything", "semeniuta"])
def test_compiled_and_python_loops_agree_float32(scheme, monkeypatch):
    from rnndrop.kernels.cpp import build

    if build.load() is None:
        pytest.skip("the compiled kernel is not available here")
    gru = GRU(16, 24, 2, bidirectional=True, dropout=SCHEMES[scheme])
    x = torch.randn(12, 5, 16, requires_grad=True)
    results = []
    for impl in ("cpp", "python"):
        monkeypatch.setenv("RNNDROP_LOOP", impl)
        torch.manual_seed(7)
        out, h = gru(x)
        grads = torch.autograd.grad(out.sum() + h.sum(), [x, *gru.parameters()])
        results.append([out, h, *grads])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


def test_zoneout_cell_is_refused():
    with pytest.raises(ValueError, match="zoneout_cell"):
        GRU(4, 6, dropout=RD(zoneout_cell=0.2))
    with pytest.raises(ValueError, match="zoneout_cell"):
        GRU(4, 6, dropout=RD.zoneout(0.1, 0.2))
    with pytest.raises(ValueError, match="zoneout_cell"):
        GRU(4, 6, dropout={"zoneout_cell": 0.3})


FUSED = ["naive", "variational_per_batch", "untied_per_batch", "weight_drop", "awd"]


def test_paths_are_the_documented_ones():
    for name, cfg in SCHEMES.items():
        loop = any(needs_loop(cfg, layer, True) for layer in (0, 1))
        assert loop == (name not in FUSED), name
    mixed = SCHEMES["input_untied_only"]
    assert needs_loop(mixed, 0, True) and not needs_loop(mixed, 1, True)
    # in eval only zoneout and classic candidate scaling need the loop
    for name, cfg in SCHEMES.items():
        loop = any(needs_loop(cfg, layer, False) for layer in (0, 1))
        assert loop == (name in ("zoneout", "everything", "classic")), name


@pytest.mark.parametrize("scheme", SCHEMES)
def test_the_module_runs_the_documented_path(scheme, monkeypatch):
    """The time loop runs exactly for the schemes that need it (spy on the loop entry)."""
    import rnndrop.nn.rnn as rnn

    calls = []
    real = rnn.rnn_layer

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(rnn, "rnn_layer", spy)
    monkeypatch.setenv("RNNDROP_LOOP", "python")
    make(scheme)(torch.randn(5, 3, 4, dtype=F64))
    assert bool(calls) == (scheme not in FUSED), scheme


def test_recorded_mask_shapes_use_three_gates():
    T, B, I, H = 5, 3, 4, 6
    shapes = {
        "variational_untied": {
            "input/l0": (3, 1, B, I),
            "between_layers/l1": (3, 1, B, H),
            "recurrent/l0": (1, 3, B, H),
            "recurrent/l1": (1, 3, B, H),
            "output": (1, B, H),
        },
        "untied_per_batch": {  # folded into W_ih / W_hh columns, recorded per gate
            "input/l0": (3, 1, 1, I),
            "between_layers/l1": (3, 1, 1, H),
            "recurrent/l0": (1, 3, 1, H),
            "output": (1, 1, H),
        },
        "variational_per_batch": {"recurrent/l0": (1, 1, 1, H), "input/l0": (1, 1, I)},
        "naive_recurrent": {"recurrent/l0": (T, 1, B, H), "input/l0": (T, B, I)},
        "recurrent_per_step_per_batch": {"recurrent/l1": (T, 1, 1, H)},
        "semeniuta": {"candidate/l0": (T, B, H)},
        "semeniuta_per_sequence": {"candidate/l1": (1, B, H)},
        "weight_drop": {"weight_hh/l0": (3 * H, H), "weight_hh/l1": (3 * H, H)},
        "zoneout": {"zoneout_hidden/l0": (T, B, H), "zoneout_hidden/l1": (T, B, H)},
    }
    for scheme, want in shapes.items():
        gru = make(scheme, I=I, H=H)
        gru.record_masks = True
        gru(torch.randn(T, B, I, dtype=F64))
        for name, shape in want.items():
            assert tuple(gru.last_masks[name].shape) == shape, (scheme, name)


def test_untied_gate_masks_differ():
    gru = GRU(30, 40, dropout=RD(input=0.3, recurrent=0.3, tied=False))
    gru.record_masks = True
    gru(torch.randn(5, 16, 30))
    inp, rec = gru.last_masks["input/l0"], gru.last_masks["recurrent/l0"].transpose(0, 1)
    for gates in (inp, rec):
        assert gates.shape[0] == 3
        for a, b in itertools.combinations(range(3), 2):
            assert not torch.equal(gates[a], gates[b])


@pytest.mark.parametrize("scheme", ["everything", "variational", "naive_recurrent"])
def test_packed_input_with_masks_matches_padded_reference(scheme, loop_impl):
    gru = make(scheme, bidir=True)
    lengths = torch.tensor([5, 3, 2])
    x = torch.randn(5, 3, 4, dtype=F64)
    h0 = torch.randn(4, 3, 6, dtype=F64)
    gru.record_masks = True
    out, h = gru(pack_padded_sequence(x, lengths), h0)
    padded, _ = pad_packed_sequence(out)
    # each sequence alone, through the reference with its slice of the recorded masks
    for b, n in enumerate(lengths.tolist()):
        masks = {k: _slice(v, k, b, n) for k, v in gru.last_masks.items()}
        ro, rh, _ = reference_gru(gru, x[:n, b : b + 1], h0[:, b : b + 1], masks)
        torch.testing.assert_close(padded[:n, b : b + 1], ro, atol=1e-10, rtol=0)
        assert (padded[n:, b] == 0).all()
        torch.testing.assert_close(h[:, b : b + 1], rh, atol=1e-10, rtol=0)


def test_packed_input_in_eval_matches_reference(loop_impl):
    """Zoneout's expectation and classic scaling, with each sequence's state carried past
    its end."""
    cfg = RD(zoneout_hidden=0.3, candidate=0.2, recurrent=0.2, scaling="classic")
    gru = GRU(4, 6, 2, bidirectional=True, dropout=cfg).to(F64).eval()
    lengths = torch.tensor([5, 3, 2])
    x = torch.randn(5, 3, 4, dtype=F64)
    out, h = gru(pack_padded_sequence(x, lengths))
    padded, _ = pad_packed_sequence(out)
    for b, n in enumerate(lengths.tolist()):
        ro, rh, _ = reference_gru(gru, x[:n, b : b + 1], None, None, sample=False)
        torch.testing.assert_close(padded[:n, b : b + 1], ro, atol=1e-10, rtol=0)
        torch.testing.assert_close(h[:, b : b + 1], rh, atol=1e-10, rtol=0)


def _slice(m, key, b, n):
    """The recorded mask restricted to sequence b's first n steps (shapes per masks.py)."""
    if key.startswith("weight_hh"):
        return m
    if key.startswith("recurrent"):  # (T|1, G, B|1, H)
        return m[:n, :, b : b + 1] if m.shape[2] > 1 else m[:n]
    if m.dim() == 4:  # untied input (3, T|1, B|1, F)
        return m[:, :n, b : b + 1] if m.shape[2] > 1 else m[:, :n]
    return m[:n, b : b + 1] if m.shape[1] > 1 else m[:n]
