import json
import pickle

import pytest
import torch

from rnndrop.data.vocab import UnknownTokenError, Vocab

TOKENS = ["a", "b", "b", "c", "c", "c"]


@pytest.mark.parametrize(
    ("order", "expected"),
    [("first", ["a", "b", "c"]), ("frequency", ["c", "b", "a"])],
)
def test_build_order(order, expected):
    assert list(Vocab.build(TOKENS, order=order).itos) == expected


def test_frequency_ties_keep_first_appearance():
    assert list(Vocab.build(["x", "y", "y", "x", "z"], order="frequency").itos) == ["x", "y", "z"]


def test_specials_first_and_unk_appended():
    v = Vocab.build(TOKENS, specials=["<pad>"], unk_token="<unk>")
    assert list(v.itos) == ["<pad>", "a", "b", "c", "<unk>"]
    assert v.unk_index == 4
    # an unk token that occurs in train keeps its first-appearance id (PTB's <unk>)
    v = Vocab.build(["x", "<unk>", "y"], unk_token="<unk>")
    assert list(v.itos) == ["x", "<unk>", "y"]


def test_min_freq_and_max_size():
    v = Vocab.build(TOKENS, min_freq=2, unk_token="<unk>")
    assert list(v.itos) == ["b", "c", "<unk>"]
    v = Vocab.build(TOKENS, order="frequency", max_size=2, unk_token="<unk>")
    assert list(v.itos) == ["c", "<unk>"]
    with pytest.raises(ValueError, match="unk_token"):
        Vocab.build(TOKENS, min_freq=2)


def test_encode_decode():
    v = Vocab.build(TOKENS)
    ids = v.encode(["c", "a", "b", "a"])
    assert ids.dtype == torch.long
    assert ids.tolist() == [2, 0, 1, 0]
    assert v.decode(ids) == ["c", "a", "b", "a"]
    assert v.decode([1, 2]) == ["b", "c"]
    assert len(v) == 3 and "a" in v and "z" not in v
    assert v.stoi["c"] == 2 and v["b"] == 1
    with pytest.raises(IndexError, match="id 7 out of range"):
        v.decode([0, 7])


def test_strict_unknown_token_names_token_and_source():
    v = Vocab.build(TOKENS)
    with pytest.raises(UnknownTokenError) as err:
        v.encode(["a", "zebra", "b"], source="valid.txt (valid split)")
    msg = str(err.value)
    assert "'zebra'" in msg and "valid.txt (valid split)" in msg and "token 1" in msg
    assert isinstance(err.value, KeyError) and isinstance(err.value, ValueError)


def test_unknown_maps_to_unk():
    v = Vocab.build(TOKENS, unk_token="<unk>")
    assert v.encode(["zebra", "a"]).tolist() == [3, 0]


def test_frozen():
    v = Vocab.build(TOKENS)
    with pytest.raises(TypeError):
        v.stoi["d"] = 3  # type: ignore[index]
    assert isinstance(v.itos, tuple)


def test_invalid_vocab():
    with pytest.raises(ValueError, match="'a' appears more than once"):
        Vocab(["a", "b", "a"])
    with pytest.raises(ValueError, match="not in the vocabulary"):
        Vocab(["a"], unk_token="<unk>")


def test_state_dict_round_trip_is_plain_python():
    v = Vocab.build(["é", "日本", "<eos>", "a"], unk_token="a")
    state = v.state_dict()
    assert json.loads(json.dumps(state)) == state  # plain types only
    w = Vocab.from_state_dict(state)
    assert w == v and w.itos == v.itos and w.unk_token == "a"
    with pytest.raises(ValueError, match="not a Vocab state"):
        Vocab.from_state_dict({"itos": ["a"]})


def test_save_load_json(tmp_path):
    v = Vocab.build(["é", "日本", "<eos>"])
    path = tmp_path / "vocab.json"
    v.save(path)
    assert json.loads(path.read_text(encoding="utf-8"))["itos"] == ["é", "日本", "<eos>"]
    assert Vocab.load(path) == v
    assert [p.name for p in tmp_path.iterdir()] == ["vocab.json"]  # no temp file left
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=r"bad\.json"):
        Vocab.load(bad)


def test_pickle():
    v = Vocab.build(TOKENS, unk_token="<unk>")
    w = pickle.loads(pickle.dumps(v))
    assert w == v and w.unk_index == v.unk_index
