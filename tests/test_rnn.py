"""rnndrop.nn.RNN and RNNCell: what only the Elman RNN has. The layer's parity (drop-in
torch.nn.RNN, every scheme that means something for it on every loop backend, against the
Elman RNN of tests/reference.py) is tests/test_parity.py's, as for every cell.

Here: the constructor's ``nonlinearity``, ``auto`` never picking Triton for it, the RNNCell
(bitwise torch.nn.RNNCell without dropout; stepped with a layer's masks, that layer), torch's
own ``ModuleInfo`` sample inputs, the language model with an RNN encoder, pickling.
"""

import itertools

import pytest
import torch
from torch import nn

from rnndrop.config import RecurrentDropout as RD
from rnndrop.kernels import BACKENDS, LayerInputs, LayerMasks, loop_backend, select_backend
from rnndrop.nn import RNN, RNNCell
from rnndrop.nn.cells import CELLS, RNN_RELU_CELL, RNN_TANH_CELL

F64 = torch.float64
NONLIN = ["tanh", "relu"]

SCHEMES = {  # the schemes the RNNCell is stepped with
    "naive_recurrent": RD.naive_recurrent(0.3),
    "variational": RD.variational(0.3),
    "variational_untied": RD.variational(0.3, tied=False),
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
}


# ---- the constructor: torch.nn.RNN's ------------------------------------------------------------


def test_constructor_matches_torch():
    with pytest.raises(ValueError, match="Unknown nonlinearity 'gelu'"):
        RNN(5, 7, nonlinearity="gelu")
    with pytest.raises(TypeError):
        RNN(5, 7, proj_size=3)
    assert "nonlinearity='relu'" in repr(RNN(5, 7, nonlinearity="relu"))
    assert RNN(5, 7).cell is RNN_TANH_CELL and RNN(5, 7, nonlinearity="relu").cell is RNN_RELU_CELL
    assert CELLS["rnn_tanh"] is RNN_TANH_CELL and CELLS["rnn_relu"] is RNN_RELU_CELL


# ---- backends without a kernel -----------------------------------------------------------------


def test_auto_never_picks_triton_for_the_rnn_on_cpu(monkeypatch):
    """The triton backend has RNN kernels (tests/test_parity.py), but on CPU only in
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
