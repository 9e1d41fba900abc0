"""Bad input gets an error that names the problem."""

import pytest
import torch

from rnndrop import functional as F
from rnndrop.config import RecurrentDropout as RD
from rnndrop.nn import LSTM, DropPath, EmbeddingDropout, LockedDropout, Zoneout


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"input_size": 0, "hidden_size": 4}, "input_size"),
        ({"input_size": 3, "hidden_size": -1}, "hidden_size"),
        ({"input_size": 3, "hidden_size": 4, "num_layers": 0}, "num_layers"),
        ({"input_size": 3, "hidden_size": 4, "proj_size": 4}, "proj_size"),
        ({"input_size": 3.0, "hidden_size": 4}, "input_size"),
        ({"input_size": 3, "hidden_size": 4, "dropout": {"inputs": 0.2}}, "inputs"),
        ({"input_size": 3, "hidden_size": 4, "dropout": "gal"}, "gal"),
        ({"input_size": 3, "hidden_size": 4, "dropout": 1.2}, r"dropout must be in \[0, 1\)"),
    ],
)
def test_constructor_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LSTM(**kwargs)


def test_dropout_of_wrong_type():
    with pytest.raises(TypeError, match="RecurrentDropout"):
        LSTM(3, 4, dropout=[0.1])


@pytest.mark.parametrize("dropout", [None, RD.variational(0.2)])
def test_forward_errors(dropout):
    lstm = LSTM(3, 4, 2, dropout=dropout)
    with pytest.raises(ValueError, match="2D or 3D"):
        lstm(torch.randn(2, 3, 4, 3))
    with pytest.raises(RuntimeError, match=r"input_size\. Expected 3, got 5"):
        lstm(torch.randn(6, 2, 5))
    with pytest.raises(RuntimeError, match=r"Expected hidden\[0\] size \(2, 2, 4\)"):
        lstm(torch.randn(6, 2, 3), (torch.zeros(1, 2, 4), torch.zeros(2, 2, 4)))
    with pytest.raises(RuntimeError, match=r"Expected hidden\[1\] size"):
        lstm(torch.randn(6, 2, 3), (torch.zeros(2, 2, 4), torch.zeros(2, 3, 4)))
    with pytest.raises(RuntimeError, match="3-D"):
        lstm(torch.randn(6, 2, 3), (torch.zeros(2, 4), torch.zeros(2, 4)))
    with pytest.raises(ValueError, match="dtype"):
        lstm(torch.randn(6, 2, 3, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="tuple"):
        lstm(torch.randn(6, 2, 3), torch.zeros(2, 2, 4))


@pytest.mark.parametrize("bad", [-0.5, 1.0, 2, "a"])
def test_functional_and_module_rates(bad):
    x = torch.randn(3, 2, 4)
    for call in (
        lambda: F.locked_dropout(x, bad),
        lambda: F.drop_path(x, bad),
        lambda: F.zoneout(x, x, bad),
        lambda: F.embedding_dropout(torch.zeros(3, 2, dtype=torch.long), torch.randn(5, 4), bad),
        lambda: LockedDropout(bad),
        lambda: DropPath(bad),
        lambda: Zoneout(bad),
        lambda: EmbeddingDropout(5, 4, p=bad),
    ):
        with pytest.raises(ValueError, match=r"\bp\b"):
            call()


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_a_backend_asked_for_that_cannot_run_says_why(backend):
    from rnndrop.kernels import rnn_layer
    from rnndrop.nn.cells import LSTM_CELL

    x = torch.randn(2, 1, 4 * 3, dtype=torch.float16)
    h0 = torch.zeros(1, 3, dtype=torch.float16)
    w_hh = torch.randn(12, 3, dtype=torch.float16)
    match = rf"the '{backend}' loop backend was asked for but cannot run"
    with pytest.raises(RuntimeError, match=match):
        rnn_layer(LSTM_CELL, x, None, None, w_hh, None, h0, h0, backend=backend)


def test_unknown_backend_name_lists_the_choices(monkeypatch):
    monkeypatch.setenv("RNNDROP_LOOP", "cuda")
    lstm = LSTM(3, 4, dropout=RD.zoneout(0.1, 0.1))
    with pytest.raises(ValueError, match=r"RNNDROP_LOOP='cuda': choose one of \['auto', "):
        lstm(torch.randn(2, 1, 3))


def test_between_layers_alone_on_one_layer_warns():
    import warnings

    with pytest.warns(UserWarning, match=r"between_layers=0\.3 does nothing with num_layers=1"):
        LSTM(3, 4, 1, dropout=RD(between_layers=0.3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same rate does work with two layers or beside others
        LSTM(3, 4, 2, dropout=RD(between_layers=0.3))
        LSTM(3, 4, 1, dropout=RD.naive(0.3))


def test_state_of_another_dtype_is_named():
    lstm = LSTM(3, 4, 1, dropout=RD.variational(0.2))
    x = torch.randn(5, 2, 3)
    hx = (torch.zeros(1, 2, 4, dtype=torch.float64), torch.zeros(1, 2, 4))
    with pytest.raises(ValueError, match=r"hx\[0\] is torch.float64 on cpu but the input is"):
        lstm(x, hx)
