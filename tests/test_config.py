import math
import warnings

import pytest

from rnndrop.config import PRESETS, RATE_FIELDS, RecurrentDropout


@pytest.mark.parametrize("field", RATE_FIELDS)
@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, math.nan, "0.3", None, True])
def test_invalid_rate_names_field_and_value(field, bad):
    with pytest.raises(ValueError) as err:
        RecurrentDropout(**{field: bad})
    assert field in str(err.value)
    assert str(bad) in str(err.value) or repr(bad) in str(err.value)


@pytest.mark.parametrize("field", RATE_FIELDS)
def test_valid_rates_accepted_and_stored_as_float(field):
    cfg = RecurrentDropout(**{field: 0})
    assert getattr(cfg, field) == 0.0 and isinstance(getattr(cfg, field), float)
    assert getattr(RecurrentDropout(**{field: 0.999}), field) == 0.999


@pytest.mark.parametrize(
    "field,value",
    [
        ("time", "per_batch"),
        ("batch", "per_step"),
        ("scaling", "scaled"),
        ("embedding_batch", "x"),
        ("tied", "yes"),
    ],
)
def test_invalid_policy_names_field(field, value):
    with pytest.raises(ValueError, match=field):
        RecurrentDropout(input=0.1, **{field: value})


def test_one_is_rejected_with_hint():
    with pytest.raises(ValueError, match="drops everything"):
        RecurrentDropout(output=1.0)


def test_frozen():
    cfg = RecurrentDropout(input=0.2)
    with pytest.raises(AttributeError):
        cfg.input = 0.3


@pytest.mark.parametrize("name", PRESETS)
def test_dict_round_trip(name):
    cfg = RecurrentDropout.preset(name)
    d = cfg.to_dict()
    assert all(isinstance(v, float | str | bool) for v in d.values())
    assert RecurrentDropout.from_dict(d) == cfg


def test_from_dict_unknown_key_lists_valid_fields():
    with pytest.raises(ValueError, match="dropouth") as err:
        RecurrentDropout.from_dict({"dropouth": 0.3})
    assert "between_layers" in str(err.value)


def test_presets_match_the_literature():
    z = RecurrentDropout.naive(0.5)
    assert (z.input, z.between_layers, z.output, z.recurrent, z.time) == (
        0.5,
        0.5,
        0.5,
        0,
        "per_step",
    )
    nr = RecurrentDropout.naive_recurrent(0.4)
    assert nr.recurrent == 0.4 and nr.time == "per_step"
    v = RecurrentDropout.variational(0.3, recurrent=0.2, embedding=0.1, tied=False)
    assert (v.input, v.output, v.recurrent, v.embedding, v.time, v.tied) == (
        0.3,
        0.3,
        0.2,
        0.1,
        "per_sequence",
        False,
    )
    zo = RecurrentDropout.zoneout(0.05, 0.5)
    assert (zo.zoneout_hidden, zo.zoneout_cell) == (0.05, 0.5) and zo.input == 0
    assert RecurrentDropout.weight_drop(0.5).weight_hh == 0.5
    s = RecurrentDropout.semeniuta(0.25)
    assert s.candidate == 0.25 and s.recurrent == 0
    a = RecurrentDropout.awd(dropoute=0.1, dropouti=0.4, dropouth=0.25, dropout=0.4, wdrop=0.5)
    assert (a.embedding, a.input, a.between_layers, a.output, a.weight_hh) == (
        0.1,
        0.4,
        0.25,
        0.4,
        0.5,
    )
    assert a.embedding_batch == "per_batch" and a.batch == "per_sample"
    assert not RecurrentDropout.none().any


def test_unknown_preset():
    with pytest.raises(ValueError, match="variational"):
        RecurrentDropout.preset("gal")


@pytest.mark.parametrize(
    "kwargs,fragment",
    [
        ({"tied": False}, "tied=False"),
        ({"tied": False, "output": 0.2}, "tied=False"),
        ({"time": "per_step", "weight_hh": 0.3}, "time="),
        ({"batch": "per_batch"}, "batch="),
        ({"embedding_batch": "per_sample"}, "embedding_batch"),
        ({"scaling": "classic", "zoneout_cell": 0.2}, "classic"),
    ],
)
def test_settings_without_effect_warn(kwargs, fragment):
    with pytest.warns(UserWarning, match=fragment):
        RecurrentDropout(**kwargs)


@pytest.mark.parametrize("name", PRESETS)
def test_presets_do_not_warn(name):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        RecurrentDropout.preset(name)


def test_replace_validates():
    with pytest.raises(ValueError, match="recurrent"):
        RecurrentDropout.variational(0.2).replace(recurrent=2.0)


def test_describe():
    assert RecurrentDropout.none().describe() == "none"
    text = RecurrentDropout.variational(0.3, tied=False).describe()
    assert "recurrent=0.3" in text and "untied" in text
