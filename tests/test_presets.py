"""Presets as users write them, on every cell (issue 20, section 5): zoneout on a GRU, preset
arguments, and the embedding rate given to a bare layer."""

import warnings

import pytest
import torch

from rnndrop.config import PRESETS, RecurrentDropout, as_dropout
from rnndrop.models import LanguageModel
from rnndrop.nn import GRU, LSTM


def test_gru_zoneout_preset_is_zoneout_on_h():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gru = GRU(3, 5, dropout="zoneout")
    assert gru.dropout.zoneout_hidden == 0.05  # Krueger et al.'s hidden-state rate
    assert gru.dropout.zoneout_cell == 0.0
    out, h = gru.train()(torch.randn(4, 2, 3))
    assert out.shape == (4, 2, 5) and h.shape == (1, 2, 5)


def test_gru_zoneout_preset_with_arguments():
    gru = GRU(3, 5, dropout={"preset": "zoneout", "hidden": 0.1})
    assert (gru.dropout.zoneout_hidden, gru.dropout.zoneout_cell) == (0.1, 0.0)
    gru(torch.randn(4, 2, 3))
    # asked for explicitly, a cell rate is still an error on a GRU
    with pytest.raises(ValueError, match=r"zoneout_cell=0\.3 have no meaning for a GRU"):
        GRU(3, 5, dropout={"preset": "zoneout", "cell": 0.3})


def test_lstm_reading_of_the_zoneout_preset_is_unchanged():
    lstm = LSTM(3, 5, dropout={"preset": "zoneout", "hidden": 0.1})
    assert (lstm.dropout.zoneout_hidden, lstm.dropout.zoneout_cell) == (0.1, 0.5)
    assert as_dropout("zoneout") == RecurrentDropout(zoneout_hidden=0.05, zoneout_cell=0.5)


def test_gru_language_model_takes_the_zoneout_preset():
    model = LanguageModel(11, embedding_size=4, hidden_size=6, encoder="gru", dropout="zoneout")
    assert model.dropout.zoneout_cell == 0.0 and model.dropout.zoneout_hidden == 0.05


def test_unknown_preset_argument_is_one_error_listing_the_arguments():
    with pytest.raises(ValueError) as err:
        as_dropout({"preset": "zoneout", "p": 0.1})
    msg = str(err.value)
    assert "'zoneout'" in msg and "['p']" in msg
    for arg in ("hidden", "cell", "concrete", "temperature"):
        assert f"'{arg}'" in msg
    with pytest.raises(ValueError, match=r"'none' takes the argument\(s\) \[\] \(none\)"):
        as_dropout({"preset": "none", "p": 0.1})


#: presets whose site a GRU lacks -> that site (the GRU refuses them, naming it)
GRU_LACKS = {"moon": "cell"}


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_builds_on_both_layers_without_warnings(name):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        if name == "awd":  # its embedding rate is the model's: the layer warns of it
            warnings.filterwarnings("ignore", message=".*embedding=0.1 has no effect")
        LSTM(3, 4, 2, dropout=name)
        if name in GRU_LACKS:
            with pytest.raises(ValueError, match=rf"{GRU_LACKS[name]}=0\.25 have no meaning "
                               r"for a GRU \(it has no cell state\)"):  # fmt: skip
                GRU(3, 4, 2, dropout=name)
        else:
            GRU(3, 4, 2, dropout=name)


@pytest.mark.parametrize("cls", [LSTM, GRU])
def test_embedding_rate_on_a_bare_layer_warns(cls):
    with pytest.warns(UserWarning, match=r"embedding=0\.5 has no effect here"):
        cls(3, 4, dropout=RecurrentDropout(embedding=0.5))
    with pytest.warns(UserWarning, match=r"embedding=0\.1 has no effect here"):
        cls(3, 4, 2, dropout="awd")


def test_a_model_that_applies_the_embedding_rate_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = LanguageModel(11, embedding_size=4, hidden_size=6, num_layers=2,
                              dropout=RecurrentDropout.awd())  # fmt: skip
    assert model.embedding.p == 0.1  # the model applies it
