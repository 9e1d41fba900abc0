import time
from pathlib import Path

import pytest
from conftest import shared_data_dir

from rnndrop.data.corpus import (
    CorpusError,
    load_ptb,
    load_text_folder,
    load_wikitext2,
    read_tokens,
)
from rnndrop.data.vocab import UnknownTokenError


def write_splits(root: Path, texts: dict[str, str | bytes], pattern: str = "{}.txt") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for split, text in texts.items():
        data = text if isinstance(text, bytes) else text.encode("utf-8")
        (root / pattern.format(split)).write_bytes(data)
    return root


TEXTS = {"train": "the cat\n\nthe dog sat\n", "valid": "dog the\n", "test": "cat\n"}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a b\n\nc\n", ["a", "b", "E", "E", "c", "E"]),  # blank lines count
        ("a b\n\nc", ["a", "b", "E", "E", "c", "E"]),  # no final newline: same
        ("a  b \r\nc\rd\n", ["a", "b", "E", "c", "E", "d", "E"]),  # \r\n, \r, extra spaces
        ("a \n b \n ", ["a", "E", "b", "E"]),  # PTB char files end in "\n "
        ("\ufeffa\n", ["a", "E"]),  # a UTF-8 BOM is not a token
    ],
)
def test_word_tokens(tmp_path, text, expected):
    path = tmp_path / "t.txt"
    path.write_bytes(text.encode("utf-8"))
    assert read_tokens(path, "word", eos="E") == expected


def test_char_tokens_and_no_eos(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("ab c\nd\n", encoding="utf-8")
    assert read_tokens(path, "char") == ["a", "b", " ", "c", "<eos>", "d", "<eos>"]
    assert read_tokens(path, "word", eos=None) == ["ab", "c", "d"]


def test_text_folder_ids_by_first_appearance(tmp_path):
    c = load_text_folder(write_splits(tmp_path / "toy", TEXTS))
    assert list(c.vocab.itos) == ["the", "cat", "<eos>", "dog", "sat"]
    assert c.train.tolist() == [0, 1, 2, 2, 0, 3, 4, 2]
    assert c.valid.tolist() == [3, 0, 2]
    assert c.test.tolist() == [1, 2]
    assert c.name == "toy" and c.level == "word" and c.vocab_size == 5
    assert c["valid"] is c.valid and c.files["test"].name == "test.txt"


def test_text_folder_char_level(tmp_path):
    texts = {"train": "ab\nba\n", "valid": "a\n", "test": "b\n"}
    c = load_text_folder(write_splits(tmp_path, texts), "char", eos="|")
    assert list(c.vocab.itos) == ["a", "b", "|"]
    assert c.train.tolist() == [0, 1, 2, 1, 0, 2] and c.level == "char"


def test_text_folder_mapping_and_other_names(tmp_path):
    root = write_splits(tmp_path / "x", TEXTS, pattern="corpus.{}.tokens")
    c = load_text_folder(root)
    assert c.valid.tolist() == [3, 0, 2]
    files = {s: root / f"corpus.{s}.tokens" for s in TEXTS}
    assert load_text_folder(files, name="m").train.tolist() == c.train.tolist()


def test_unknown_tokens_strict_and_mapped(tmp_path):
    texts = dict(TEXTS, test="cat zebra\n")
    root = write_splits(tmp_path, texts)
    with pytest.raises(UnknownTokenError) as err:
        load_text_folder(root)
    assert "'zebra'" in str(err.value) and "test.txt" in str(err.value)
    assert "test split" in str(err.value)
    c = load_text_folder(root, unk_token="<unk>")
    assert c.vocab.itos[-1] == "<unk>" and c.test.tolist() == [1, 5, 2]


def test_ptb_and_wikitext_layouts(tmp_path):
    ptb = write_splits(tmp_path / "ptb", TEXTS, pattern="ptb.{}.txt")
    assert load_ptb(ptb).train.tolist() == [0, 1, 2, 2, 0, 3, 4, 2]
    char = {"train": "a _ b \n b \n ", "valid": "b \n ", "test": "a \n "}
    c = load_ptb(write_splits(tmp_path / "ptb", char, pattern="ptb.char.{}.txt"), "char")
    assert list(c.vocab.itos) == ["a", "_", "b", "<eos>"]
    assert c.train.tolist() == [0, 1, 2, 3, 2, 3] and c.name == "ptb_char"
    wiki = write_splits(tmp_path / "wt2", TEXTS, pattern="wiki.{}.tokens")
    assert load_wikitext2(wiki).valid.tolist() == [3, 0, 2]


# errors users hit: each message names the file or directory and says what was expected
def test_missing_split_file(tmp_path):
    root = write_splits(tmp_path / "ptb", {"train": "a\n", "valid": "a\n"}, "ptb.{}.txt")
    with pytest.raises(CorpusError, match=r"missing ptb\.test\.txt.*expected ptb\.train\.txt"):
        load_ptb(root)
    with pytest.raises(CorpusError, match=r"no file for the test split.*test\.txt"):
        load_text_folder(write_splits(tmp_path / "t", {"train": "a\n", "valid": "a\n"}))


def test_empty_file(tmp_path):
    root = write_splits(tmp_path, dict(TEXTS, valid=" \n\n"))
    with pytest.raises(CorpusError, match=r"empty file: .*valid\.txt"):
        load_text_folder(root)


def test_wrong_encoding(tmp_path):
    root = write_splits(tmp_path, dict(TEXTS, train="caf\xe9 ok\n".encode("latin-1")))
    with pytest.raises(CorpusError) as err:
        load_text_folder(root)
    msg = str(err.value)
    assert "train.txt" in msg and "not UTF-8" in msg and "0xe9" in msg and "line 1" in msg


def test_wrong_layout_hints(tmp_path):
    write_splits(tmp_path / "data" / "ptb", TEXTS, pattern="ptb.{}.txt")
    with pytest.raises(CorpusError, match=r"files are in .*data/ptb, pass that directory"):
        load_ptb(tmp_path / "data")
    wiki = write_splits(tmp_path / "wt2", TEXTS, pattern="wiki.{}.tokens")
    with pytest.raises(CorpusError, match=r"wrong directory layout.*load_wikitext2"):
        load_ptb(wiki)
    with pytest.raises(CorpusError, match=r"nowhere does not exist"):
        load_ptb(tmp_path / "nowhere")
    with pytest.raises(CorpusError, match=r"is a file; expected a directory"):
        load_wikitext2(wiki / "wiki.train.tokens")
    (tmp_path / "amb").mkdir()
    for name in ("a.train.txt", "b.train.txt", "valid.txt", "test.txt"):
        (tmp_path / "amb" / name).write_text("x\n")
    with pytest.raises(CorpusError, match=r"several files could be the train split"):
        load_text_folder(tmp_path / "amb")


def test_reads_megabytes_in_seconds(tmp_path):
    line = " ".join(f"w{i % 5000}" for i in range(20)) + "\n"
    train = line * 40_000  # ~4 MB, 840k tokens
    root = write_splits(tmp_path, {"train": train, "valid": line, "test": line})
    start = time.perf_counter()
    c = load_text_folder(root)
    assert len(c.train) == 40_000 * 21
    assert time.perf_counter() - start < 10.0


SHARED = shared_data_dir()  # from conftest
needs_shared = pytest.mark.skipif(SHARED is None, reason="opt-in: set RNNDROP_SHARED_DATA")


@pytest.mark.shared_data
@needs_shared
@pytest.mark.parametrize(
    ("name", "sizes", "types"),
    [
        ("ptb", (929_589, 73_760, 82_430), 10_000),
        ("ptb_char", (5_017_482, 393_042, 442_423), 50),  # 49 symbols + <eos>
        ("wikitext2", (2_088_628, 217_646, 245_569), 33_278),
    ],
)
def test_shared_corpus_counts(name, sizes, types):
    from rnndrop.data.download import fetch

    root = fetch(name, SHARED, download=False)  # sha256-verified local copy
    if name == "wikitext2":
        c = load_wikitext2(root)
    else:
        c = load_ptb(root, "char" if name == "ptb_char" else "word")
    assert (len(c.train), len(c.valid), len(c.test)) == sizes
    assert len(c.vocab) == types
