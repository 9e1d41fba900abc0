"""Consistency with torch beyond the forward (issue 20, sections 4 and 6).

- autocast(bfloat16) on CPU: every scheme returns the dtype ``torch.nn.LSTM``/``GRU``
  return (found: the LSTM with an output mask returned float32 where ``nn.LSTM`` returns
  bfloat16; the GRU with zoneout or Semeniuta bfloat16 where ``nn.GRU`` returns float32);
- ``proj_size`` with a loop-path scheme (found: a ``ValueError``): the reference loop with
  the projection step, against the independent reference LSTM and ``nn.LSTM``;
- ``torch.compile``: no graph break in eval mode, outputs equal eager.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from compare import assert_matches_reference
from reference import reference_lstm
from torch import nn

from rnndrop.config import RecurrentDropout as RD
from rnndrop.nn import GRU, LSTM

SCHEMES = {
    "none": None,
    "output": RD(output=0.3),
    "naive": RD.naive(0.3),
    "variational": RD.variational(0.3),
    "untied": RD.variational(0.3, tied=False),
    "naive_recurrent": RD.naive_recurrent(0.3),
    "zoneout": RD.zoneout(0.2, 0.3),
    "semeniuta": RD.semeniuta(0.3),
    "weight_drop": RD.weight_drop(0.3),
    "classic": RD(recurrent=0.3, candidate=0.2, scaling="classic", time="per_sequence"),
}


def _pair(cell: str, scheme: str, layers: int = 2):
    """Our layer and torch's, same weights."""
    cfg = SCHEMES[scheme]
    if cell == "gru" and cfg is not None and cfg.zoneout_cell:
        cfg = RD(zoneout_hidden=cfg.zoneout_hidden)
    ours_cls, torch_cls = (LSTM, nn.LSTM) if cell == "lstm" else (GRU, nn.GRU)
    torch.manual_seed(0)
    ours = ours_cls(3, 5, layers, dropout=cfg)
    theirs = torch_cls(3, 5, layers)
    theirs.load_state_dict(ours.state_dict(), strict=False)
    return ours, theirs


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("scheme", list(SCHEMES))
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_autocast_bf16_cpu_dtype_matches_torch(cell, scheme, mode):
    ours, theirs = _pair(cell, scheme)
    getattr(ours, mode)()
    getattr(theirs, mode)()
    x = torch.randn(6, 2, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, state = ours(x)
        want, want_state = theirs(x)
    states = state if isinstance(state, tuple) else (state,)
    want_states = want_state if isinstance(want_state, tuple) else (want_state,)
    assert out.dtype == want.dtype
    assert [s.dtype for s in states] == [s.dtype for s in want_states]
    # close to the float32 module (same masks): the low precision is only rounding
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ours(x)[0]
    torch.manual_seed(1)
    ref = ours(x)[0]
    torch.testing.assert_close(out.float(), ref, atol=0.06, rtol=0.05)
    (out.float().square().sum()).backward()
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in ours.parameters())


def test_autocast_eval_without_loop_equals_torch_bitwise():
    """Where the fused op runs (eval, no zoneout), the result is torch's, bit for bit."""
    ours, theirs = _pair("lstm", "variational")
    ours.eval(), theirs.eval()
    x = torch.randn(6, 2, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(ours(x)[0], theirs(x)[0])


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("scheme", ["untied", "naive_recurrent", "zoneout", "semeniuta",
                                    "classic"])  # fmt: skip
def test_proj_size_on_the_loop_path_matches_the_independent_reference(scheme, mode):
    """``proj_size`` with loop-path schemes (found: a ``ValueError``): outputs, states and
    gradients equal the plain reference LSTM with ``h_t = W_hr (o ⊙ tanh c_t)``, run with the
    masks the module recorded."""
    lstm = LSTM(3, 6, 2, proj_size=2, bidirectional=True, dropout=SCHEMES[scheme],
                dtype=torch.float64)  # fmt: skip
    getattr(lstm, mode)()
    x = torch.randn(5, 3, 3, dtype=torch.float64, requires_grad=True)
    hx = (torch.randn(4, 3, 2, dtype=torch.float64, requires_grad=True),
          torch.randn(4, 3, 6, dtype=torch.float64, requires_grad=True))  # fmt: skip
    assert_matches_reference(lstm, reference_lstm, x, hx, sample=mode == "train")


def test_proj_size_loop_without_masks_equals_nn_lstm():
    """The loop path's projection step is torch's: forced onto the loop with no dropout,
    the layer equals ``nn.LSTM(proj_size=...)``, packed input included."""
    ours = LSTM(3, 6, 2, proj_size=2, bidirectional=True, dtype=torch.float64)
    theirs = nn.LSTM(3, 6, 2, proj_size=2, bidirectional=True, dtype=torch.float64)
    theirs.load_state_dict(ours.state_dict())
    ours.force_loop = True
    x = torch.randn(5, 3, 3, dtype=torch.float64)
    packed = nn.utils.rnn.pack_padded_sequence(x, [5, 2, 4], enforce_sorted=False)
    for inp in (x, packed):
        out, (h, c) = ours(inp)
        want, (wh, wc) = theirs(inp)
        if isinstance(out, nn.utils.rnn.PackedSequence):
            out, want = out.data, want.data
        for a, b in ((out, want), (h, wh), (c, wc)):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


# ---- torch.compile -------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["none", "variational", "zoneout", "classic"])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_compile_eval_has_no_graph_break_and_equals_eager(cell, scheme):
    ours, _ = _pair(cell, scheme)
    ours.eval()
    x = torch.randn(5, 2, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch._dynamo.reset()
        explained = torch._dynamo.explain(ours)(x)
        assert explained.graph_break_count == 0, explained.break_reasons
        compiled = torch.compile(ours, backend="aot_eager")
        out = compiled(x)[0]
    torch.testing.assert_close(out, ours(x)[0])
    out.sum().backward()  # eval with gradients (saliency, attacks): differentiable


@pytest.mark.slow
def test_compile_inductor_inference_equals_eager():
    ours, _ = _pair("lstm", "zoneout")
    ours.eval()
    x = torch.randn(5, 2, 3)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch._dynamo.reset()
        out = torch.compile(ours)(x)[0]
    torch.testing.assert_close(out, ours(x)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["variational", "zoneout", "weight_drop"])
def test_compile_training_breaks_only_at_deliberate_opaque_calls(scheme, capfd):
    """Training: the graph breaks only where masks are drawn (a Python seed each) and around
    each loop layer's autograd node, never on incidental Python (a lock, a string, an
    ``.item()``), and the first call prints no dynamo warning. Compiled equals eager."""
    ours, _ = _pair("lstm", scheme)
    ours.train()
    x = torch.randn(5, 2, 3)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(ours)(x)
    reasons = [str(r.reason).splitlines()[0] for r in explained.break_reasons]
    assert all("torch.compiler.disable" in r for r in reasons), reasons
    torch._dynamo.reset()
    capfd.readouterr()
    torch.manual_seed(3)
    out = torch.compile(ours, backend="aot_eager")(x)[0]
    err = capfd.readouterr().err
    assert "hashlib" not in err and "sys.audit" not in err and "item()" not in err, err
    torch.manual_seed(3)
    torch.testing.assert_close(out, ours(x)[0])
