"""Export and deployment of every scheme in eval mode (issue 20, section 2).

Found from outside: the legacy ONNX exporter wrote a graph with no inputs and one constant
of uninitialised memory; ``torch.export`` (strict) failed even without dropout; dynamo ONNX
and non-strict export failed for zoneout; ``jit.script`` failed with an unreadable error
and a train-mode ``jit.trace`` froze the masks silently. Here each exporter runs the
eval-mode model, and the exported program (ONNX Runtime for ONNX) is run on a *new* input
and compared with eager mode. The README's export matrix is this file's parametrisation.
"""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from compare import layer_for
from torch import nn

from rnndrop.config import RecurrentDropout as RD
from rnndrop.nn import LSTM

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

SCHEMES = {
    "none": None,
    "naive": RD.naive(0.3),
    "variational": RD.variational(0.3),
    "untied": RD.variational(0.3, tied=False),
    "zoneout": RD.zoneout(0.2, 0.3),
    "semeniuta": RD.semeniuta(0.3),
    "weight_drop": RD.weight_drop(0.3),
    "awd": RD.awd(dropoute=0.0),
    "classic": RD(recurrent=0.3, candidate=0.2, output=0.2, scaling="classic", time="per_sequence"),
}
EXPORTERS = ["export_strict", "export_nonstrict", "onnx_dynamo", "onnx_legacy", "jit_trace"]


class Model(nn.Module):
    """A small model around the layer: the output and every final state."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out, state = self.layer(x)
        return (out, *state) if isinstance(state, tuple) else (out, state)


def _layer(cell: str, scheme: str) -> nn.Module:
    torch.manual_seed(0)
    return layer_for(cell, SCHEMES[scheme], 3, 5, 2, bidirectional=True)


def _onnx_run(path_or_bytes, x: torch.Tensor) -> list[torch.Tensor]:
    sess = ort.InferenceSession(path_or_bytes)
    (name,) = [i.name for i in sess.get_inputs()]
    return [torch.from_numpy(o) for o in sess.run(None, {name: x.numpy()})]


def run_exported(model: nn.Module, exporter: str, x: torch.Tensor, x_new: torch.Tensor, tmp):
    """Export ``model`` with ``x`` and run the exported form on ``x_new``."""
    if exporter.startswith("export_"):
        ep = torch.export.export(model, (x,), strict=exporter == "export_strict")
        return list(ep.module()(x_new))
    if exporter == "onnx_dynamo":
        path = str(tmp / "model.onnx")
        torch.onnx.export(model, (x,), path, dynamo=True, verbose=False)
        return _onnx_run(path, x_new)
    if exporter == "onnx_legacy":
        path = str(tmp / "model.onnx")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice
            torch.onnx.export(model, (x,), path, dynamo=False)
        graph = onnx.load(path).graph
        assert len(graph.input) == 1  # not a constant graph (the bug this was)
        return _onnx_run(path, x_new)
    if exporter == "jit_trace":
        buf = io.BytesIO()
        torch.jit.save(torch.jit.trace(model, (x,)), buf)
        buf.seek(0)
        return list(torch.jit.load(buf)(x_new))
    raise ValueError(exporter)


@pytest.mark.slow
@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("scheme", list(SCHEMES))
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_eval_mode_exports_equal_eager(cell, scheme, exporter, tmp_path):
    model = Model(_layer(cell, scheme)).eval()
    x, x_new = torch.randn(4, 2, 3), torch.randn(4, 2, 3)
    with torch.no_grad():
        want = model(x_new)
    got = run_exported(model, exporter, x, x_new, tmp_path)
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("exporter", EXPORTERS)
def test_proj_size_on_the_loop_path_exports(exporter, tmp_path):
    """An LSTM with projections and zoneout (the reference loop's projection step)."""
    torch.manual_seed(0)
    model = Model(LSTM(3, 6, 2, proj_size=2, dropout=SCHEMES["zoneout"])).eval()
    x, x_new = torch.randn(4, 2, 3), torch.randn(4, 2, 3)
    with torch.no_grad():
        want = model(x_new)
    got = run_exported(model, exporter, x, x_new, tmp_path)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_legacy_onnx_of_a_bare_layer(cell, tmp_path):
    """``torch.onnx.export(rnndrop.nn.LSTM(...), (x,), dynamo=False)`` used to raise a
    ``TypeError`` (a keyword-only parameter passed positionally)."""
    layer = _layer(cell, "zoneout").eval()
    x, x_new = torch.randn(4, 2, 3), torch.randn(4, 2, 3)
    path = str(tmp_path / "layer.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(layer, (x,), path, dynamo=False)
    got = _onnx_run(path, x_new)
    torch.testing.assert_close(got[0], layer(x_new)[0].detach(), atol=1e-5, rtol=1e-5)


def test_exported_program_keeps_zoneout_expectation_not_a_constant():
    """The exported graph computes from its input: two inputs give two eager outputs."""
    model = Model(_layer("lstm", "zoneout")).eval()
    ep = torch.export.export(model, (torch.randn(4, 2, 3),))
    for _ in range(2):
        x = torch.randn(4, 2, 3)
        torch.testing.assert_close(ep.module()(x)[0], model(x)[0])


# ---- refusals: never a silently wrong file ------------------------------------------


def test_jit_script_refuses_naming_torch_export():
    model = Model(_layer("lstm", "variational"))
    with pytest.raises(RuntimeError, match=r"torch\.export"):
        torch.jit.script(model)


@pytest.mark.parametrize("mode", ["train", "mc"])
def test_trace_refuses_to_freeze_masks(mode):
    """A trace records one call's masks as constants: in training or MC mode it refuses."""
    layer = _layer("lstm", "variational")
    model = Model(layer).train() if mode == "train" else Model(layer).eval()
    layer.mc = mode == "mc"
    with pytest.raises(RuntimeError, match="freeze"):
        torch.jit.trace(model, (torch.randn(4, 2, 3),))


@pytest.mark.parametrize("module", ["locked", "embedding", "zoneout", "droppath"])
def test_trace_of_the_dropout_modules_in_training_refuses(module):
    """The building blocks (``rnndrop.nn.LockedDropout``, ...) draw masks too."""
    from rnndrop.nn import DropPath, EmbeddingDropout, LockedDropout, Zoneout

    x = torch.randn(4, 2, 3)
    mod, args = {
        "locked": (LockedDropout(0.3), (x,)),
        "embedding": (EmbeddingDropout(10, 3, 0.3), (torch.randint(0, 10, (4, 2)),)),
        "zoneout": (Zoneout(0.3), (x, x + 1)),
        "droppath": (DropPath(0.3), (x,)),
    }[module]
    with pytest.raises(RuntimeError, match="freeze"):
        torch.jit.trace(mod.train(), args)
    torch.jit.trace(mod.eval(), args)  # eval: deterministic, traced


@pytest.mark.parametrize("cls", ["LSTMCell", "GRUCell"])
def test_step_cells_refuse_script_and_a_sampling_trace(cls):
    """The step cells draw masks too: a trace in training would freeze them; script is
    refused with the alternatives; an eval-mode trace equals eager on a new input."""
    import rnndrop.nn

    cell = getattr(rnndrop.nn, cls)(3, 5, dropout="variational")
    x = torch.randn(2, 3)
    with pytest.raises(RuntimeError, match=r"torch\.export"):
        torch.jit.script(cell)
    with pytest.raises(RuntimeError, match="freeze"), cell.train().sequence():
        torch.jit.trace(cell, (x,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the trace's own warnings on Python-side checks
        traced = torch.jit.trace(cell.eval(), (x,))
    x2 = torch.randn(2, 3)
    got, want = traced(x2), cell(x2)
    for a, b in zip(got if isinstance(got, tuple) else (got,),
                    want if isinstance(want, tuple) else (want,), strict=True):  # fmt: skip
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("strict", [True, False])
def test_export_in_training_mode_refuses(strict):
    """Masks come from Python-side seeds: export says to use eval mode (it used to stop on
    an obscure data-dependent error)."""
    model = Model(_layer("lstm", "naive")).train()
    with pytest.raises(Exception, match="Export in eval mode"):
        torch.export.export(model, (torch.randn(4, 2, 3),), strict=strict)


def test_legacy_onnx_in_training_mode_refuses(tmp_path):
    model = Model(_layer("gru", "semeniuta")).train()
    with pytest.raises(RuntimeError, match="freeze"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(4, 2, 3),), str(tmp_path / "m.onnx"),
                          dynamo=False, training=torch.onnx.TrainingMode.TRAINING)  # fmt: skip


def test_trace_of_a_loop_layer_refuses_another_length():
    """A trace unrolls the loop for the traced length: another length raises (``nn.LSTM``'s
    trace runs any length; a loop layer's never silently truncates)."""
    model = Model(_layer("lstm", "zoneout")).eval()
    traced = torch.jit.trace(model, (torch.randn(4, 2, 3),))
    with pytest.raises(RuntimeError, match="Expected 4 elements"):
        traced(torch.randn(6, 2, 3))


def test_trace_without_active_dropout_in_training_is_allowed():
    """No mask is drawn (no rate set): nothing to freeze, the trace equals eager."""
    model = Model(_layer("lstm", "none")).train()
    x = torch.randn(4, 2, 3)
    traced = torch.jit.trace(model, (x,))
    x_new = torch.randn(4, 2, 3)
    torch.testing.assert_close(traced(x_new)[0], model(x_new)[0])
