"""Language-modelling corpora as token-id tensors: PTB (word, char), WikiText-2, any text folder.

Token convention (pytorch/examples ``word_language_model`` and awd-lstm-lm): each line is split
on whitespace and followed by one ``<eos>``; blank lines count, so they give a lone ``<eos>``.
Lines end at ``\\n``, ``\\r\\n`` or ``\\r`` (Python's universal newlines, as in ``for line in
open(f)``); a blank unterminated tail after the last newline is not a line (PTB's char files
end in ``"\\n "``). With this convention PTB train has 929,589 tokens and 10,000 types, WikiText-2
train 2,088,628 tokens and 33,278 types.

The vocabulary is built from the training split (first-appearance order, see
:class:`~rnndrop.data.vocab.Vocab`) and frozen; valid and test are encoded with it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from torch import Tensor

from .vocab import Vocab

__all__ = [
    "SPLITS",
    "Corpus",
    "CorpusError",
    "load_ptb",
    "load_text_folder",
    "load_wikitext2",
    "read_tokens",
]

SPLITS = ("train", "valid", "test")
Tokenization = Literal["word", "char"]
PathLike = str | os.PathLike

# file names a text folder may use for each split, in order of preference
_FOLDER_NAMES = {
    "train": ("train.txt", "train", "train.tokens"),
    "valid": ("valid.txt", "valid", "valid.tokens", "val.txt", "validation.txt", "dev.txt"),
    "test": ("test.txt", "test", "test.tokens"),
}
_KNOWN_LAYOUTS = {  # a file that identifies a corpus, and the loader for it
    "ptb.train.txt": "load_ptb (corpus='ptb')",
    "ptb.char.train.txt": "load_ptb(level='char') (corpus='ptb_char')",
    "wiki.train.tokens": "load_wikitext2 (corpus='wikitext2')",
    "train-images-idx3-ubyte.gz": "rnndrop.data.mnist (PixelMNISTDataModule)",
}


class CorpusError(ValueError):
    """A corpus file or folder is missing, empty, not UTF-8 or laid out unexpectedly."""


@dataclass(frozen=True, eq=False)
class Corpus:
    """Train/valid/test token ids and the vocabulary that made them.

    Args:
        train, valid, test: 1-D LongTensors of token ids, ``<eos>`` included.
        vocab: the frozen vocabulary, built from ``train``.
        name: short name (``"ptb"``, ``"ptb_char"``, ``"wikitext2"`` or the folder's name).
        level: ``"word"`` or ``"char"``.
        files: the file each split was read from.
    """

    train: Tensor
    valid: Tensor
    test: Tensor
    vocab: Vocab
    name: str
    level: str = "word"
    files: Mapping[str, Path] = field(default_factory=dict)

    def __getitem__(self, split: str) -> Tensor:
        if split not in SPLITS:
            raise KeyError(f"split must be one of {SPLITS}, got {split!r}")
        return getattr(self, split)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def __repr__(self) -> str:
        sizes = ", ".join(f"{s}={len(self[s]):,}" for s in SPLITS)
        return f"Corpus({self.name!r}, level={self.level!r}, vocab={len(self.vocab):,}, {sizes})"


def _read_text(path: Path) -> str:
    """The file's text, with clear errors for missing, empty and non-UTF-8 files."""
    if not path.exists():
        raise CorpusError(f"missing file: {path} does not exist")
    if not path.is_file():
        raise CorpusError(f"expected a text file at {path}, found a directory or special file")
    data = path.read_bytes()
    if not data.strip():
        raise CorpusError(f"empty file: {path} has no tokens (expected text, one sentence a line)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise CorpusError(
            f"wrong encoding: {path} is not UTF-8 (byte 0x{data[e.start]:02x} at offset "
            f"{e.start}, line {line}); expected UTF-8 text. Convert it first, e.g. "
            f"`iconv -f latin1 -t utf-8 {path.name}`"
        ) from None
    return text.removeprefix("\ufeff")  # a UTF-8 byte-order mark is not a token


def read_tokens(
    path: PathLike,
    tokenization: Tokenization = "word",
    eos: str | None = "<eos>",
) -> list[str]:
    """Tokens of a UTF-8 text file: per line, whitespace-split words (or characters), then ``eos``.

    ``"char"`` keeps every character of the line, spaces included; the newline itself is
    represented by ``eos`` (or dropped when ``eos`` is None).
    """
    path = Path(path)
    if tokenization not in ("word", "char"):
        raise ValueError(f"tokenization must be 'word' or 'char', got {tokenization!r}")
    text = _read_text(path)
    if "\r" in text:  # universal newlines, as text-mode iteration over the file does
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    lines = text.split("\n")
    # the final newline ends the last line, it does not start a new one; PTB char files end
    # in "\n " (their line separator is " \n "), so a blank unterminated tail is no line either
    if not lines[-1].strip():
        lines.pop()
    split = str.split if tokenization == "word" else list
    out: list[str] = []
    extend = out.extend
    for line in lines:
        extend(split(line))
        if eos is not None:
            out.append(eos)
    return out


def _check_dir(root: Path, expected: Sequence[str], what: str) -> None:
    """Raise a CorpusError if ``root`` is not a directory holding ``expected`` files."""
    if not root.exists():
        raise CorpusError(
            f"{what}: directory {root} does not exist (expected {', '.join(expected)})"
        )
    if not root.is_dir():
        raise CorpusError(
            f"{what}: {root} is a file; expected a directory holding {', '.join(expected)}"
        )
    missing = [n for n in expected if not (root / n).is_file()]
    if not missing:
        return
    present = sorted(p.name for p in root.iterdir())
    hint = ""
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):  # pointed one level too high?
        if all((sub / n).is_file() for n in expected):
            hint = f"; the files are in {sub}, pass that directory instead"
    for marker, loader in _KNOWN_LAYOUTS.items():
        if not hint and marker in present and marker not in expected:
            hint = f"; {root} looks like the layout that {loader} expects"
    shown = ", ".join(present[:10]) + (", ..." if len(present) > 10 else "") or "nothing"
    raise CorpusError(
        f"{what}: wrong directory layout in {root}: missing {', '.join(missing)} "
        f"(expected {', '.join(expected)}; found {shown}){hint}"
    )


def _build(
    files: Mapping[str, Path],
    name: str,
    level: str,
    tokenization: Tokenization,
    eos: str | None,
    unk_token: str | None,
) -> Corpus:
    tokens = {s: read_tokens(files[s], tokenization, eos) for s in SPLITS}
    vocab = Vocab.build(tokens["train"], unk_token=unk_token)
    ids = {s: vocab.encode(tokens[s], source=f"{files[s]} ({s} split)") for s in SPLITS}
    return Corpus(**ids, vocab=vocab, name=name, level=level, files=dict(files))


def load_ptb(
    root: PathLike, level: Literal["word", "char"] = "word", *, unk_token: str | None = None
) -> Corpus:
    """Penn Treebank, Mikolov's language-modelling version (10k words; 49 characters).

    Word level reads ``ptb.{train,valid,test}.txt``. Char level reads ``ptb.char.*.txt``, whose
    format is one space-separated symbol per character with ``_`` between words and a line per
    sentence; it is tokenised by whitespace too, so ``_`` is a token and each line gets an
    ``<eos>`` (train: 5,017,482 tokens, 50 types with ``<eos>``).

    Args:
        root: directory with the files (e.g. what ``fetch("ptb")`` returns).
        level: ``"word"`` or ``"char"``.
        unk_token: None (default) raises on a valid/test token unseen in train (PTB has none);
            ``"<unk>"`` maps such tokens to PTB's own unknown token.
    """
    if level not in ("word", "char"):
        raise ValueError(f"level must be 'word' or 'char', got {level!r}")
    stem = "ptb." if level == "word" else "ptb.char."
    root = Path(root)
    names = {s: f"{stem}{s}.txt" for s in SPLITS}
    _check_dir(root, list(names.values()), f"PTB ({level} level)")
    files = {s: root / n for s, n in names.items()}
    name = "ptb" if level == "word" else "ptb_char"
    return _build(files, name, level, "word", "<eos>", unk_token)


def load_wikitext2(root: PathLike, *, unk_token: str | None = None) -> Corpus:
    """WikiText-2 (v1, tokenised; Merity et al. 2016): ``wiki.{train,valid,test}.tokens``.

    Train has 2,088,628 tokens and 33,278 types with ``<eos>``; valid/test have no unseen tokens.

    Args:
        root: directory with the files (e.g. what ``fetch("wikitext2")`` returns).
        unk_token: as in :func:`load_ptb`.
    """
    root = Path(root)
    names = {s: f"wiki.{s}.tokens" for s in SPLITS}
    _check_dir(root, list(names.values()), "WikiText-2")
    files = {s: root / n for s, n in names.items()}
    return _build(files, "wikitext2", "word", "word", "<eos>", unk_token)


def _find_split(root: Path, split: str) -> Path | None:
    for name in _FOLDER_NAMES[split]:
        if (root / name).is_file():
            return root / name
    # "<anything>.<split>.txt" / ".tokens", as in ptb.train.txt or wiki.train.tokens
    found = sorted(
        p
        for p in root.iterdir()
        if p.is_file() and p.suffix in (".txt", ".tokens") and p.stem.endswith(f".{split}")
    )
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise CorpusError(
            f"text folder {root}: several files could be the {split} split ({names}); "
            "pass a mapping {'train': ..., 'valid': ..., 'test': ...} instead"
        )
    return found[0] if found else None


def load_text_folder(
    root_or_files: PathLike | Mapping[str, PathLike],
    tokenization: Tokenization = "word",
    *,
    eos: bool | str = True,
    unk_token: str | None = None,
    name: str | None = None,
) -> Corpus:
    """Any local train/valid/test text files (UTF-8), tokenised by word or by character.

    A directory must hold one file per split: ``train.txt`` (or ``train``, ``train.tokens``,
    ``*.train.txt``, ``*.train.tokens``), likewise ``valid`` (also ``val``, ``validation``,
    ``dev``) and ``test``. Or pass a mapping ``{"train": path, "valid": path, "test": path}``.

    Args:
        root_or_files: the directory, or the mapping of split to file.
        tokenization: ``"word"`` (whitespace split) or ``"char"`` (every character, spaces
            included).
        eos: True appends ``"<eos>"`` after each line; a string uses that token; False adds
            none (then line breaks vanish from the stream).
        unk_token: None raises on a valid/test token unseen in train; a token (e.g.
            ``"<unk>"``) maps unseen tokens to it, adding it to the vocabulary if needed.
        name: corpus name; defaults to the directory's name.
    """
    eos_token = "<eos>" if eos is True else (eos or None)
    if isinstance(root_or_files, Mapping):
        missing = [s for s in SPLITS if s not in root_or_files]
        if missing:
            raise CorpusError(f"text files: the mapping lacks {missing}; expected keys {SPLITS}")
        files = {s: Path(root_or_files[s]) for s in SPLITS}
        default_name = files["train"].parent.name or "text"
    else:
        root = Path(root_or_files)
        if not root.is_dir():
            what = "does not exist" if not root.exists() else "is a file"
            raise CorpusError(
                f"text folder {root} {what}; expected a directory with train/valid/test files "
                "(train.txt, valid.txt, test.txt)"
            )
        found = {s: _find_split(root, s) for s in SPLITS}
        missing = [s for s, p in found.items() if p is None]
        if missing:
            present = sorted(p.name for p in root.iterdir())[:10]
            raise CorpusError(
                f"text folder {root}: wrong directory layout, no file for the "
                f"{'/'.join(missing)} split (expected e.g. "
                f"{', '.join(_FOLDER_NAMES[s][0] for s in missing)}; found "
                f"{', '.join(present) or 'nothing'})"
            )
        files = {s: p for s, p in found.items() if p is not None}
        default_name = root.resolve().name
    level = "char" if tokenization == "char" else "word"
    return _build(files, name or default_name, level, tokenization, eos_token, unk_token)
