"""rnndrop.nn.RNN and RNNCell: drop-in torch.nn.RNN / RNNCell (bitwise at no dropout), and
every scheme that means something for them on the loop backends, against the independent
Elman RNN of tests/reference.py (the cell: step by step, against the layer so checked).

The module records the masks it drew; the reference applies them at their sites by the
book (``h' = φ(W_ih x + b_ih + W_hh h + b_hh)``, zoneout on ``h``). Agreement of outputs and
gradients shows each mask acts at its site and that the hand-written backward of each loop
backend (``cpp``: ``cell_rnn.h``; ``python``: ``nn/cells/rnn.py``) is right.
"""

import itertools

import pytest
import torch
from compare import assert_matches_reference
from reference import reference_rnn
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from rnndrop.config import RecurrentDropout as RD
from rnndrop.kernels import BACKENDS, LayerInputs, LayerMasks, loop_backend, select_backend
from rnndrop.nn import RNN, RNNCell, mc_dropout
from rnndrop.nn.cells import CELLS, RNN_RELU_CELL, RNN_TANH_CELL
from rnndrop.nn.masks import needs_loop

F64 = torch.float64
NONLIN = ["tanh", "relu"]

SCHEMES = {
    "naive": RD.naive(0.3),
    "naive_recurrent": RD.naive_recurrent(0.3),
    "variational": RD.variational(0.3),
    "variational_untied": RD.variational(0.3, tied=False),
    "variational_per_batch": RD.variational(0.3).replace(batch="per_batch"),
    "recurrent_per_step_per_batch": RD(recurrent=0.3, time="per_step", batch="per_batch"),
    "zoneout": RD.zoneout(hidden=0.2, cell=0.0),
    "weight_drop": RD.weight_drop(0.4),
    "everything": RD(
        input=0.2,
        between_layers=0.2,
        recurrent=0.2,
        output=0.2,
        weight_hh=0.2,
        zoneout_hidden=0.1,
        tied=False,
    ),
    "classic": RD(
        input=0.2, between_layers=0.2, recurrent=0.2, output=0.3, weight_hh=0.2, scaling="classic"
    ),
}


# ---- drop-in: torch.nn.RNN ----------------------------------------------------------------


def make_pair(nonlinearity, layers=2, bidir=False, batch_first=False, bias=True, dtype=F64):
    ref = nn.RNN(5, 7, layers, nonlinearity, bias, batch_first, 0.0, bidir).to(dtype)
    ours = RNN(5, 7, layers, nonlinearity, bias, batch_first, None, bidir).to(dtype)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def run(model, x, hx):
    out, h = model(x, hx) if hx is not None else model(x)
    assert isinstance(h, torch.Tensor)  # an RNN's state is h alone
    loss = out.square().sum() + h.sin().sum()
    leaves = [x, *([hx] if hx is not None else []), *model.parameters()]
    return [out, h, *torch.autograd.grad(loss, leaves)]


def test_parameters_state_dicts_and_init_are_torchs():
    for nl, layers, bidir, bias in itertools.product(NONLIN, [1, 3], [False, True], [True, False]):
        torch.manual_seed(3)
        ref = nn.RNN(5, 7, layers, nl, bias=bias, bidirectional=bidir)
        torch.manual_seed(3)
        ours = RNN(5, 7, layers, nl, bias=bias, bidirectional=bidir)
        assert [(n, p.shape) for n, p in ref.named_parameters()] == [
            (n, p.shape) for n, p in ours.named_parameters()
        ]
        for a, b in zip(ref.parameters(), ours.parameters(), strict=True):
            assert torch.equal(a, b)  # same initialisation, same order
        # state dicts both ways, strict
        ref.load_state_dict(ours.state_dict())
        ours.load_state_dict(ref.state_dict())
    assert RNN(5, 7).weight_ih_l0.shape == (7, 5)  # one gate block


def test_constructor_matches_torch():
    with pytest.raises(ValueError, match="Unknown nonlinearity 'gelu'"):
        RNN(5, 7, nonlinearity="gelu")
    with pytest.raises(TypeError):
        RNN(5, 7, proj_size=3)
    assert "nonlinearity='relu'" in repr(RNN(5, 7, nonlinearity="relu"))
    assert RNN(5, 7).cell is RNN_TANH_CELL and RNN(5, 7, nonlinearity="relu").cell is RNN_RELU_CELL
    assert CELLS["rnn_tanh"] is RNN_TANH_CELL and CELLS["rnn_relu"] is RNN_RELU_CELL


@pytest.mark.parametrize("nonlinearity", NONLIN)
@pytest.mark.parametrize("layers,bidir,batch_first,with_hx",
                         list(itertools.product([1, 2], [False, True], [False, True],
                                                [False, True])))  # fmt: skip
def test_no_dropout_is_bitwise_nn_rnn(nonlinearity, layers, bidir, batch_first, with_hx):
    ref, ours = make_pair(nonlinearity, layers, bidir, batch_first, dtype=torch.float32)
    x = torch.randn((3, 6, 5) if batch_first else (6, 3, 5), requires_grad=True)
    D = 2 if bidir else 1
    hx = torch.randn(layers * D, 3, 7, requires_grad=True) if with_hx else None
    for a, b in zip(run(ref, x, hx), run(ours, x, hx), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("nonlinearity", NONLIN)
def test_unbatched_and_packed_are_bitwise_nn_rnn(nonlinearity):
    ref, ours = make_pair(nonlinearity, bidir=True, dtype=torch.float32)
    x = torch.randn(6, 5, requires_grad=True)
    for a, b in zip(run(ref, x, None), run(ours, x, None), strict=True):
        assert torch.equal(a, b)
    xs = torch.randn(6, 3, 5)
    packed = pack_padded_sequence(xs, torch.tensor([6, 4, 2]))
    (ro, rh), (oo, oh) = ref(packed), ours(packed)
    assert torch.equal(ro.data, oo.data) and torch.equal(rh, oh)


@pytest.mark.parametrize("nonlinearity", NONLIN)
def test_loop_without_masks_matches_nn_rnn(nonlinearity, loop_impl):
    """The loop path (forced, no mask) computes nn.RNN: outputs and gradients, packed too."""
    ref, ours = make_pair(nonlinearity, bidir=True)
    ours.force_loop = True
    x = torch.randn(6, 3, 5, dtype=F64, requires_grad=True)
    hx = torch.randn(4, 3, 7, dtype=F64, requires_grad=True)
    for a, b in zip(run(ref, x, hx), run(ours, x, hx), strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    packed = pack_padded_sequence(x.detach(), torch.tensor([6, 4, 2]))
    (ro, rh), (oo, oh) = ref(packed, hx.detach()), ours(packed, hx.detach())
    torch.testing.assert_close(oo.data, ro.data, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(oh, rh, atol=1e-12, rtol=1e-12)


# ---- schemes against the independent reference -----------------------------------------------


def make(scheme, nonlinearity="tanh", layers=2, bidir=False, H=6, I=4, bias=True):
    cfg = SCHEMES[scheme]
    return RNN(I, H, layers, nonlinearity, bias, dropout=cfg, bidirectional=bidir).to(F64)


def check(rnn, x, hx, sample):
    masks = assert_matches_reference(rnn, reference_rnn, x, hx, sample, tol=1e-10)
    if sample:  # not vacuous: something is dropped, something kept
        assert masks and any((m == 0).any() for m in masks.values())
        assert all((m != 0).any() for m in masks.values())


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("nonlinearity", NONLIN)
@pytest.mark.parametrize("bidir", [False, True])
def test_training_matches_reference(scheme, nonlinearity, bidir, loop_impl):
    torch.manual_seed(1)
    rnn = make(scheme, nonlinearity, bidir=bidir)
    x = torch.randn(5, 3, 4, dtype=F64, requires_grad=True)
    hx = torch.randn(2 * (2 if bidir else 1), 3, 6, dtype=F64, requires_grad=True)
    check(rnn, x, hx, sample=True)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_eval_matches_reference_expectations(scheme, loop_impl):
    rnn = make(scheme, bidir=True).eval()
    x = torch.randn(5, 3, 4, dtype=F64, requires_grad=True)
    check(rnn, x, None, sample=False)


@pytest.mark.parametrize("scheme", ["variational", "zoneout", "everything"])
def test_mc_mode_and_no_bias_match_reference(scheme, loop_impl):
    rnn = make(scheme, "relu", bias=False).eval()
    x = torch.randn(5, 3, 4, dtype=F64, requires_grad=True)
    with mc_dropout(rnn):
        check(rnn, x, None, sample=True)


def test_the_loop_runs_for_per_sample_recurrent_and_zoneout():
    """Not vacuous: these schemes take the loop path (the backends under test)."""
    for scheme in ("variational", "zoneout", "naive_recurrent", "everything"):
        assert needs_loop(SCHEMES[scheme], 0, True)


@pytest.mark.parametrize("nonlinearity", NONLIN)
def test_packed_input_with_zoneout_matches_each_sequence_alone(nonlinearity, loop_impl):
    rnn = make("everything", nonlinearity, bidir=True)
    lengths = torch.tensor([5, 3, 2])
    x = torch.randn(5, 3, 4, dtype=F64)
    h0 = torch.randn(4, 3, 6, dtype=F64)
    rnn.record_masks = True
    out, h = rnn(pack_padded_sequence(x, lengths), h0)
    padded, _ = pad_packed_sequence(out)
    for b, n in enumerate(lengths.tolist()):
        masks = {k: _slice(v, k, b, n) for k, v in rnn.last_masks.items()}
        ro, rh, _ = reference_rnn(rnn, x[:n, b : b + 1], h0[:, b : b + 1], masks)
        torch.testing.assert_close(padded[:n, b : b + 1], ro, atol=1e-10, rtol=0)
        torch.testing.assert_close(h[:, b : b + 1], rh, atol=1e-10, rtol=0)


def _slice(m, key, b, n):
    """The recorded mask restricted to sequence b's first n steps (shapes per masks.py)."""
    if key.startswith("weight_hh"):
        return m
    if key.startswith("recurrent"):  # (T|1, 1, B|1, H)
        return m[:n, :, b : b + 1] if m.shape[2] > 1 else m[:n]
    if m.dim() == 4:  # untied input (1, T|1, B|1, F)
        return m[:, :n, b : b + 1] if m.shape[2] > 1 else m[:, :n]
    return m[:n, b : b + 1] if m.shape[1] > 1 else m[:n]


@pytest.mark.parametrize("nonlinearity", NONLIN)
def test_concrete_zoneout_and_recurrent_rate_gradients_agree_across_backends(nonlinearity):
    """Mask gradients through the loop (concrete dropout): cpp equals python."""
    cfg = RD(recurrent=0.3, zoneout_hidden=0.2, time="per_step", concrete=True)
    grads = {}
    for backend in ("python", "cpp"):
        torch.manual_seed(0)
        rnn = RNN(4, 6, 2, nonlinearity, dropout=cfg, bidirectional=True).to(F64)
        x = torch.randn(5, 3, 4, dtype=F64)
        torch.manual_seed(1)
        with loop_backend(backend):
            out, h = rnn(x)
            (out.square().sum() + h.sum()).backward()
        grads[backend] = {n: p.grad for n, p in rnn.named_parameters()}
    assert any(n.startswith("dropout_logit") for n in grads["cpp"])
    for n, g in grads["python"].items():
        torch.testing.assert_close(grads["cpp"][n], g, atol=1e-10, rtol=1e-10)


# ---- sites without a meaning, backends without a kernel -------------------------------------


def test_sites_without_meaning_raise():
    with pytest.raises(ValueError, match=r"candidate=0\.3 have no meaning for a RNN_TANH"):
        RNN(4, 6, dropout=RD(candidate=0.3))
    with pytest.raises(ValueError, match=r"zoneout_cell=0\.3 have no meaning for a RNN_RELU"):
        RNN(4, 6, nonlinearity="relu", dropout=RD(zoneout_cell=0.3))
    # the zoneout preset is read for the cell: zoneout on h alone
    assert RNN(4, 6, dropout="zoneout").dropout.zoneout_cell == 0.0


def test_auto_never_picks_triton_for_the_rnn_on_cpu(monkeypatch):
    """The triton backend has RNN kernels (tests/test_triton.py), but on CPU only in
    Triton's interpreter, which auto never takes."""
    pytest.importorskip("triton", reason="triton is not installed (the 'triton' extra)")
    x = torch.randn(3, 2, 4)
    inp = LayerInputs(RNN_TANH_CELL, x, torch.randn(5, 4), None, torch.randn(5, 5), None,
                      torch.zeros(2, 5), None, LayerMasks())  # fmt: skip
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "TRITON_INTERPRET=1" in BACKENDS["triton"].unavailable(inp)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert BACKENDS["triton"].unavailable(inp) is None
    with loop_backend("auto"):
        assert select_backend(inp).name != "triton"


# ---- RNNCell ---------------------------------------------------------------------------------


@pytest.mark.parametrize("nonlinearity", NONLIN)
@pytest.mark.parametrize("batched,with_hx", list(itertools.product([True, False], [True, False])))
def test_cell_without_dropout_is_bitwise_nn_rnncell(nonlinearity, batched, with_hx):
    torch.manual_seed(4)
    ref = nn.RNNCell(5, 7, nonlinearity=nonlinearity)
    torch.manual_seed(4)
    ours = RNNCell(5, 7, nonlinearity=nonlinearity)
    for a, b in zip(ref.parameters(), ours.parameters(), strict=True):
        assert torch.equal(a, b)  # same init
    ours.load_state_dict(ref.state_dict())
    ref.load_state_dict(ours.state_dict())
    x = torch.randn((3, 5) if batched else (5,), requires_grad=True)
    hx = torch.randn((3, 7) if batched else (7,), requires_grad=True) if with_hx else None
    results = []
    for cell in (ref, ours):
        h = cell(x, hx)
        leaves = [x, *([hx] if with_hx else []), *cell.parameters()]
        results.append([h, *torch.autograd.grad(h.sin().sum(), leaves)])
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)
    assert "nonlinearity='relu'" in repr(RNNCell(5, 7, nonlinearity="relu"))
    with pytest.raises(ValueError, match="candidate"):
        RNNCell(5, 7, dropout=RD(candidate=0.2))


CELL_SCHEMES = ["naive_recurrent", "variational", "variational_untied", "zoneout", "weight_drop",
                "everything"]  # fmt: skip


@pytest.mark.parametrize("nonlinearity", NONLIN)
@pytest.mark.parametrize("scheme", CELL_SCHEMES)
def test_cell_loop_with_the_layers_masks_is_the_layer(nonlinearity, scheme):
    """The cell, stepped with the masks a one-layer RNN drew (``masks_from``), computes that
    layer: outputs, final state and gradients (the layer is checked against the reference)."""
    cfg = SCHEMES[scheme].replace(between_layers=0.0)  # one layer: nothing between layers
    layer = RNN(4, 6, 1, nonlinearity, dropout=cfg).to(F64)
    cell = RNNCell(4, 6, nonlinearity=nonlinearity, dropout=cfg).to(F64)
    cell.load_state_dict({k.removesuffix("_l0"): v for k, v in layer.state_dict().items()})
    x = torch.randn(5, 3, 4, dtype=F64, requires_grad=True)
    h0 = torch.randn(3, 6, dtype=F64, requires_grad=True)
    layer.record_masks = True
    out, hn = layer(x, h0[None])
    assert layer.last_masks
    leaves = [x, h0]
    want = [out, hn[0], *torch.autograd.grad(out.sin().sum() + hn.cos().sum(),
                                             leaves + list(layer.parameters()))]  # fmt: skip
    h, outs = h0, []
    for t in range(5):
        o, h = cell(x[t], h, masks=cell.masks_from(layer.last_masks, t), return_output=True)
        outs.append(o)
    cell_out = torch.stack(outs)
    got = [cell_out, h, *torch.autograd.grad(cell_out.sin().sum() + h.cos().sum(),
                                             leaves + list(cell.parameters()))]  # fmt: skip
    for k, (a, b) in enumerate(zip(want, got, strict=True)):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12, msg=f"item {k}")


def test_eval_cell_loop_is_the_eval_layer():
    cfg = RD(recurrent=0.2, weight_hh=0.3, input=0.1, zoneout_hidden=0.2, scaling="classic")
    layer = RNN(4, 6, 1, dropout=cfg).to(F64).eval()
    cell = RNNCell(4, 6, dropout=cfg).to(F64).eval()
    cell.load_state_dict({k.removesuffix("_l0"): v for k, v in layer.state_dict().items()})
    x = torch.randn(5, 3, 4, dtype=F64)
    out, hn = layer(x)
    h, outs = None, []
    for t in range(5):
        h = cell(x[t], h)
        outs.append(h)
    torch.testing.assert_close(torch.stack(outs), out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h, hn[0], rtol=1e-12, atol=1e-12)


# ---- torch's own sample inputs (ModuleInfo) ------------------------------------------------


def _torch_module_samples(cls):
    """torch's ``module_db`` sample inputs for ``cls`` (float64, training), or a skip.

    ``torch.testing._internal`` imports ``expecttest`` for its test-case classes, which
    these samples do not use: a stand-in is put in place for the import only, if absent.
    """
    import importlib.util
    import sys
    import types
    import unittest

    stub = None
    if importlib.util.find_spec("expecttest") is None:
        stub = types.ModuleType("expecttest")
        stub.TestCase = unittest.TestCase
        sys.modules["expecttest"] = stub
    try:
        from torch.testing._internal.common_modules import module_db
    except Exception as e:  # an internal module: its imports change between versions
        pytest.skip(f"torch's module_db is unavailable here: {e!r}")
    finally:
        if stub is not None and sys.modules.get("expecttest") is stub:
            del sys.modules["expecttest"]
    infos = [m for m in module_db if m.module_cls is cls]
    if not infos:
        pytest.skip(f"torch's module_db has no {cls.__name__}")
    return [s for m in infos
            for s in m.module_inputs_func(m, device="cpu", dtype=F64, requires_grad=True,
                                          training=True)]  # fmt: skip


@pytest.mark.parametrize("ours_cls,torch_cls", [(RNN, nn.RNN), (RNNCell, nn.RNNCell)])
def test_torch_module_info_samples(ours_cls, torch_cls):
    """Every sample input torch tests nn.RNN / nn.RNNCell with: same outputs and gradients
    (bitwise on the fused op); for the layer also through both loop backends (forced)."""
    samples = _torch_module_samples(torch_cls)
    assert samples
    for s in samples:
        args, kwargs = s.constructor_input.args, dict(s.constructor_input.kwargs)
        ref = torch_cls(*args, **kwargs).to(F64)
        if ours_cls is RNN and kwargs.get("dropout"):
            kwargs["dropout"] = float(kwargs["dropout"])
        ours = ours_cls(*args, **kwargs).to(F64)
        ours.load_state_dict(ref.state_dict())
        if kwargs.get("dropout"):  # torch's dropout draws its own masks: compare in eval
            ref.eval()
            ours.eval()
        fargs = [a.detach().clone().requires_grad_() if isinstance(a, torch.Tensor) else a
                 for a in s.forward_input.args]  # fmt: skip
        want = _outputs(ref, fargs, s.forward_input.kwargs)
        for a, b in zip(want, _outputs(ours, fargs, s.forward_input.kwargs), strict=True):
            assert torch.equal(a, b), (args, kwargs)
        if ours_cls is RNN:
            ours.force_loop = True
            for backend in ("python", "cpp"):
                with loop_backend(backend):
                    got = _outputs(ours, fargs, s.forward_input.kwargs)
                for a, b in zip(want, got, strict=True):
                    torch.testing.assert_close(b, a, atol=1e-12, rtol=1e-12)


def _outputs(module, args, kwargs) -> list:
    """The module's outputs and the gradients of a loss of them w.r.t. inputs and weights."""
    out = module(*args, **kwargs)
    out = out if isinstance(out, tuple) else (out,)
    loss = sum(o.sin().sum() for o in out)
    leaves = [a for a in args if isinstance(a, torch.Tensor)] + list(module.parameters())
    return [*out, *torch.autograd.grad(loss, leaves)]


# ---- in a model: the embedding site ------------------------------------------------------------


def test_language_model_with_rnn_encoder_drops_word_types_and_zones_out():
    """``encoder="rnn"``: the embedding site (word types, Gal & Ghahramani 2016) acts in the
    model, zoneout on h in the layer; the ``"zoneout"`` preset reads as h-only for the RNN."""
    from rnndrop.models import LanguageModel

    torch.manual_seed(0)
    cfg = RD(embedding=0.5, zoneout_hidden=0.1, weight_hh=0.2)
    lm = LanguageModel(vocab_size=30, embedding_size=8, hidden_size=8, num_layers=2,
                       encoder="rnn", dropout=cfg)  # fmt: skip
    assert isinstance(lm.encoder.parts[0], RNN) and lm.encoder.parts[0].nonlinearity == "tanh"
    tokens = torch.randint(0, 30, (4, 6))
    lm.train()
    emb = lm.features(tokens)
    # a dropped word type is zero at every position it occurs (one mask per call)
    dropped = emb.abs().sum(-1) == 0
    assert dropped.any() and not dropped.all()
    for b in range(4):
        for i in range(6):
            same = tokens[b] == tokens[b, i]
            assert (dropped[b][same] == dropped[b, i]).all()
    out = lm(tokens)
    out.logits.sum().backward()
    assert lm.encoder.parts[0].weight_hh_l0.grad is not None
    assert LanguageModel(vocab_size=30, embedding_size=8, hidden_size=8, encoder="rnn",
                         dropout="zoneout").dropout.zoneout_cell == 0.0  # fmt: skip


def test_modules_pickle_whole():
    """torch.save of a whole module (and spawned workers) pickle the cell record."""
    import io

    x = torch.randn(4, 2, 5)
    for module in (RNN(5, 7, 2, "relu", dropout="zoneout"), RNNCell(5, 7, nonlinearity="relu")):
        module.eval()
        buf = io.BytesIO()
        torch.save(module, buf)
        buf.seek(0)
        again = torch.load(buf, weights_only=False)
        assert again.cell.name == module.cell.name == "rnn_relu"
        inp = x if isinstance(module, RNN) else x[0]
        assert torch.equal(_first(again(inp)), _first(module(inp)))


def _first(out):
    return out[0] if isinstance(out, tuple) else out
