"""Token <-> id mapping for language modelling: built once from the training split, then frozen.

No torchtext: a vocabulary is a tuple of strings (``itos``) and its inverse dict (``stoi``).
It is saved with checkpoints (:meth:`Vocab.state_dict`) or as JSON (:meth:`Vocab.save`), so
ids never shift between the run that trained a model and the one that evaluates it.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from ..atomic import atomic_write

__all__ = ["UnknownTokenError", "Vocab"]

_FORMAT = "rnndrop.Vocab/1"


class UnknownTokenError(KeyError, ValueError):
    """A token is not in a vocabulary that has no unknown token.

    Subclasses both ``KeyError`` (a failed lookup) and ``ValueError`` (bad input data).
    """

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0]) if self.args else ""


class Vocab:
    """A frozen token vocabulary with an explicit unknown-token policy.

    Ids follow ``itos``: :meth:`build` orders tokens by **first appearance** in the training
    stream (the pytorch/examples and awd-lstm-lm ``Dictionary`` convention, so PTB ids match
    theirs) or, with ``order="frequency"``, by decreasing count with ties broken by first
    appearance.

    Unknown tokens: with ``unk_token=None`` (strict) encoding a token not in the vocabulary
    raises :class:`UnknownTokenError` naming the token, its position and the source; with
    ``unk_token="<unk>"`` such tokens map to that token's id. PTB and WikiText-2 already
    contain ``<unk>`` in their training text, so using it as ``unk_token`` adds no new type.

    Args:
        itos: the tokens, index = id. Must be distinct.
        unk_token: token that unknown tokens map to (must be in ``itos``), or None.
    """

    def __init__(self, itos: Sequence[str], unk_token: str | None = None) -> None:
        self._itos: tuple[str, ...] = tuple(itos)
        stoi = {tok: i for i, tok in enumerate(self._itos)}
        if len(stoi) != len(self._itos):
            dup = next(t for t, c in Counter(self._itos).items() if c > 1)
            raise ValueError(f"Vocab tokens must be distinct; {dup!r} appears more than once")
        if unk_token is not None and unk_token not in stoi:
            raise ValueError(f"unk_token {unk_token!r} is not in the vocabulary")
        self._stoi = MappingProxyType(stoi)
        self.unk_token = unk_token

    @classmethod
    def build(
        cls,
        tokens: Iterable[str],
        *,
        order: Literal["first", "frequency"] = "first",
        specials: Sequence[str] = (),
        unk_token: str | None = None,
        min_freq: int = 1,
        max_size: int | None = None,
    ) -> Vocab:
        """Build a vocabulary from a training token stream.

        Args:
            tokens: the training tokens, in order.
            order: ``"first"`` (first appearance) or ``"frequency"`` (most common first).
            specials: tokens given the first ids, in this order, whether or not they occur.
            unk_token: the unknown token; added after the others if it does not occur.
            min_freq: drop tokens seen fewer times (they then need an ``unk_token``).
            max_size: keep at most this many tokens, specials and ``unk_token`` included.
        """
        if order not in ("first", "frequency"):
            raise ValueError(f"order must be 'first' or 'frequency', got {order!r}")
        counts = Counter(tokens)  # dicts keep insertion order: first appearance
        if (min_freq > 1 or max_size is not None) and unk_token is None:
            raise ValueError("min_freq/max_size drop tokens, so they need an unk_token")
        words = [t for t, c in counts.items() if c >= min_freq and t not in specials]
        if order == "frequency":
            words.sort(key=lambda t: -counts[t])  # stable: ties stay in first-appearance order
        itos = list(dict.fromkeys(specials)) + words
        if max_size is not None:
            itos = itos[: max_size - (unk_token not in itos[:max_size])]
        if unk_token is not None and unk_token not in itos:
            itos.append(unk_token)
        return cls(itos, unk_token)

    # mapping -----------------------------------------------------------------------------
    @property
    def itos(self) -> tuple[str, ...]:
        """Id -> token."""
        return self._itos

    @property
    def stoi(self) -> Mapping[str, int]:
        """Token -> id (read-only)."""
        return self._stoi

    @property
    def unk_index(self) -> int | None:
        """Id of ``unk_token``, or None in strict mode."""
        return None if self.unk_token is None else self._stoi[self.unk_token]

    def __len__(self) -> int:
        return len(self._itos)

    def __contains__(self, token: object) -> bool:
        return token in self._stoi

    def __getitem__(self, token: str) -> int:
        return int(self.encode([token])[0])

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Vocab):
            return NotImplemented
        return self._itos == other._itos and self.unk_token == other.unk_token

    __hash__ = None  # type: ignore[assignment]  # mutable-looking; compare by value only

    def __repr__(self) -> str:
        return f"Vocab(size={len(self)}, unk_token={self.unk_token!r})"

    def __reduce__(self) -> tuple[Any, ...]:  # picklable (ddp_spawn, workers) despite the proxy
        return (Vocab, (self._itos, self.unk_token))

    def encode(self, tokens: Iterable[str], source: str | None = None) -> Tensor:
        """Ids of ``tokens`` as a 1-D LongTensor.

        Args:
            tokens: the tokens to look up.
            source: where the tokens come from (a file or split name), for error messages.

        Raises:
            UnknownTokenError: a token is unknown and ``unk_token`` is None.
        """
        tokens = tokens if isinstance(tokens, Sequence) else list(tokens)
        get = self._stoi.get
        ids = [get(t, -1) for t in tokens]
        if self.unk_token is None:
            if -1 in ids:
                pos = ids.index(-1)
                where = f" in {source}" if source else ""
                raise UnknownTokenError(
                    f"unknown token {tokens[pos]!r} at token {pos}{where}: it is not in the "
                    f"vocabulary ({len(self)} tokens, built from the training split) and "
                    "unk_token is None; pass unk_token='<unk>' (or another token) to map "
                    "unknown tokens to it"
                )
        else:
            unk = self._stoi[self.unk_token]
            ids = [unk if i < 0 else i for i in ids]
        return torch.from_numpy(np.asarray(ids, dtype=np.int64).reshape(-1))

    def decode(self, ids: Tensor | Iterable[int]) -> list[str]:
        """Tokens of ``ids`` (any shape is flattened)."""
        if isinstance(ids, Tensor):
            ids = ids.reshape(-1).tolist()
        itos = self._itos
        try:
            return [itos[i] for i in ids]
        except IndexError:
            bad = next(i for i in ids if not -len(itos) <= i < len(itos))
            raise IndexError(f"id {bad} out of range for a vocabulary of {len(self)}") from None

    # persistence ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Plain python types (a list and strings), safe in a Lightning checkpoint."""
        return {"format": _FORMAT, "itos": list(self._itos), "unk_token": self.unk_token}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> Vocab:
        """Inverse of :meth:`state_dict`."""
        if state.get("format") != _FORMAT or "itos" not in state:
            raise ValueError(
                f"not a Vocab state (expected format {_FORMAT!r}, got {state.get('format')!r})"
            )
        return cls(state["itos"], state.get("unk_token"))

    def save(self, path: str | os.PathLike) -> None:
        """Write the vocabulary as JSON (UTF-8), atomically (temporary file, fsync, rename)."""
        text = json.dumps(self.state_dict(), ensure_ascii=False)
        with atomic_write(path, "w", encoding="utf-8") as f:
            f.write(text)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Vocab:
        """Read a vocabulary written by :meth:`save`."""
        try:
            state = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read a Vocab from {path}: {e}") from e
        try:
            return cls.from_state_dict(state)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
