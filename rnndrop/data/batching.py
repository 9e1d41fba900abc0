"""Language-model batching: parallel token streams cut into truncated-BPTT chunks.

The corpus (one long token stream) is cut into ``B`` contiguous pieces, one per batch row
(:func:`batchify`); :class:`BPTTBatches` then walks along the pieces ``bptt`` steps at a time.
Row ``b`` of chunk ``k+1`` continues row ``b`` of chunk ``k`` exactly, so a model can carry its
hidden state from one chunk to the next (detached: truncated backprop through time).
This is the scheme of pytorch/examples ``word_language_model`` and awd-lstm-lm, made
batch-first, resumable mid-epoch and splittable across DDP ranks.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

__all__ = ["BPTTBatches", "batchify", "variable_lengths"]


def batchify(ids: Tensor, batch_size: int) -> Tensor:
    """Cut a 1-D token stream into ``batch_size`` contiguous streams (rows), dropping the rest.

    Row ``b`` is ``ids[b*N:(b+1)*N]`` with ``N = len(ids) // batch_size``; the last
    ``len(ids) % batch_size`` tokens are dropped.

    Shape:
        ``(L,)`` -> ``(B, N)``, batch-first.
    """
    if ids.dim() != 1:
        raise ValueError(f"ids must be 1-D, got shape {tuple(ids.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = ids.numel() // batch_size
    if n < 2:
        raise ValueError(
            f"{ids.numel()} tokens are too few for batch_size={batch_size}: each stream needs "
            "at least 2 tokens (an input and its target)"
        )
    return ids[: n * batch_size].view(batch_size, n)


def _epoch_seed(seed: int, epoch: int) -> int:
    digest = hashlib.blake2b(f"bptt/{seed}/{epoch}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def variable_lengths(
    total: int,
    bptt: int,
    generator: torch.Generator,
    *,
    p_full: float = 0.95,
    sigma: float = 5.0,
    min_len: int = 5,
    max_len: int | None = None,
) -> list[int]:
    """AWD-LSTM's random chunk lengths (Merity et al. 2017, awd-lstm-lm ``main.py``).

    Each chunk's mean is ``bptt`` with probability ``p_full``, else ``bptt / 2``; its length is
    ``max(min_len, int(N(mean, sigma)))``, capped at ``max_len`` if given and at the tokens left.
    Returns lengths summing to ``total``.
    """
    lengths: list[int] = []
    left = total
    while left > 0:
        u = torch.rand((), generator=generator, dtype=torch.float64).item()
        z = torch.randn((), generator=generator, dtype=torch.float64).item()
        mean = bptt if u < p_full else bptt / 2
        n = max(min_len, int(mean + sigma * z))  # int() truncates, as awd-lstm-lm does
        if max_len is not None:
            n = min(n, max_len)
        n = min(n, left)
        lengths.append(n)
        left -= n
    return lengths


class BPTTBatches:
    """Batch-first truncated-BPTT chunks ``(x, y)`` over parallel streams, ``y`` = ``x`` shifted.

    Chunk ``k`` of a pass is ``x = streams[:, i:i+T]``, ``y = streams[:, i+1:i+1+T]`` where
    ``i`` is the sum of the previous chunk lengths, so consecutive chunks are contiguous in every
    row. The last chunk is kept even when shorter than ``bptt``; a pass covers each stream's
    ``N - 1`` input positions once. Iterating again starts the next epoch.

    With ``variable=True`` the lengths follow AWD-LSTM (:func:`variable_lengths`: mean ``bptt``
    with probability 0.95 else ``bptt/2``, then ``N(mean, 5)``, at least 5), drawn from a
    generator seeded by ``(seed, epoch)``: the same seed gives the same chunks in every run,
    a new epoch gives new lengths, and so a slightly different number of chunks (``len()`` is
    that of the current epoch). AWD also scales the learning rate by ``T / bptt`` for each
    chunk; ``x.shape[1]`` is ``T``.

    DDP: with ``world_size > 1`` the ``B`` rows are split into ``world_size`` contiguous blocks
    and rank ``r`` gets block ``r`` (``B / world_size`` rows). ``B`` must be divisible by
    ``world_size`` (a ``ValueError`` otherwise): dropping rows silently would lose data on some
    ranks only. All ranks get the same chunk lengths, hence the same number of batches.

    Resuming: :meth:`state_dict` records the epoch and the index of the next chunk;
    :meth:`load_state_dict` (or ``start=``) makes the next iteration continue from there with
    exactly the chunks the interrupted run would have produced.

    Args:
        streams: ``(B, N)`` LongTensor from :func:`batchify`.
        bptt: steps per chunk (the mean length when ``variable``).
        variable: AWD's randomised chunk lengths.
        seed: seed of the random lengths; or pass ``generator`` to draw one from it.
        generator: a ``torch.Generator`` to draw ``seed`` from (used once, at construction).
        start: index of the first chunk of the first pass (resume without a state dict).
        rank, world_size: this process's share of the rows under DDP.
        max_len: cap on variable chunk lengths (awd-lstm-lm leaves it uncapped).

    Shape:
        yields ``x, y`` of shape ``(B / world_size, T)``, ``T <= bptt`` unless ``variable``.
    """

    def __init__(
        self,
        streams: Tensor,
        bptt: int,
        *,
        variable: bool = False,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        start: int = 0,
        rank: int = 0,
        world_size: int = 1,
        max_len: int | None = None,
    ) -> None:
        if streams.dim() != 2:
            raise ValueError(f"streams must be (B, N), got shape {tuple(streams.shape)}")
        if streams.shape[1] < 2:
            raise ValueError(f"streams need at least 2 steps, got N={streams.shape[1]}")
        if bptt < 1:
            raise ValueError(f"bptt must be >= 1, got {bptt}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}"
            )
        rows = streams.shape[0]
        if rows % world_size:
            raise ValueError(
                f"{rows} streams cannot be split evenly over world_size={world_size} ranks; "
                "make the number of streams (batch size) a multiple of the world size"
            )
        per_rank = rows // world_size
        self.streams = streams[rank * per_rank : (rank + 1) * per_rank]  # (B / world_size, N)
        self.bptt, self.variable, self.max_len = bptt, variable, max_len
        self.rank, self.world_size = rank, world_size
        if seed is None:
            seed = 0 if generator is None else int(torch.randint(2**62, (), generator=generator))
        self.seed = int(seed)
        self._epoch = 0  # epoch of the current (or next) pass
        self._index = start  # next chunk to yield
        self._resume = start != 0
        self._cache: tuple[int, list[int]] | None = None

    @property
    def num_tokens(self) -> int:
        """Input positions per pass, over this rank's rows."""
        return self.streams.shape[0] * (self.streams.shape[1] - 1)

    def lengths(self, epoch: int | None = None) -> list[int]:
        """Chunk lengths of a pass (the current epoch by default)."""
        epoch = self._epoch if epoch is None else epoch
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        total = self.streams.shape[1] - 1
        if self.variable:
            gen = torch.Generator().manual_seed(_epoch_seed(self.seed, epoch))
            lengths = variable_lengths(total, self.bptt, gen, max_len=self.max_len)
        else:
            full, rest = divmod(total, self.bptt)
            lengths = [self.bptt] * full + ([rest] if rest else [])  # last chunk kept, shorter
        self._cache = (epoch, lengths)
        return lengths

    def __len__(self) -> int:
        return len(self.lengths())

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        if not self._resume and self._index:  # a fresh iter() after a pass (or a broken-off one)
            self._epoch += 1
            self._index = 0
        self._resume = False
        if self._index >= len(self.lengths()):  # saved after the last chunk: next epoch
            self._epoch, self._index = self._epoch + 1, 0
        epoch, lengths = self._epoch, self.lengths()
        pos = sum(lengths[: self._index])
        for k in range(self._index, len(lengths)):
            n = lengths[k]
            x = self.streams[:, pos : pos + n]  # (B, T)
            y = self.streams[:, pos + 1 : pos + 1 + n]  # (B, T), the next tokens
            pos += n
            self._index = k + 1
            yield x, y
        if self._epoch == epoch:
            self._epoch, self._index = epoch + 1, 0
            self._resume = True  # the next pass is this new epoch, from chunk 0

    def set_epoch(self, epoch: int) -> None:
        """Make the next pass epoch ``epoch`` from its first chunk."""
        self._epoch, self._index, self._resume = epoch, 0, True

    def state_dict(self) -> dict[str, Any]:
        """Where the next chunk comes from: epoch, chunk index, token offset, seed, shape."""
        return {
            "epoch": self._epoch,
            "index": self._index,
            "position": sum(self.lengths()[: self._index]),
            "seed": self.seed,
            "bptt": self.bptt,
            "variable": self.variable,
            "shape": list(self.streams.shape),
            "rank": self.rank,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``: the next iteration yields chunk ``state["index"]`` onwards."""
        mine = self.state_dict()
        for key in ("bptt", "variable", "shape", "world_size"):
            if key in state and state[key] != mine[key]:
                raise ValueError(
                    f"cannot resume BPTT batches: saved {key}={state[key]!r} but this loader "
                    f"has {key}={mine[key]!r} (same corpus, batch size, bptt and world size needed)"
                )
        self.seed = int(state.get("seed", self.seed))
        self._epoch, self._index, self._resume = int(state["epoch"]), int(state["index"]), True
        self._cache = None

    def __repr__(self) -> str:
        b, n = self.streams.shape
        kind = "variable" if self.variable else "fixed"
        return f"BPTTBatches(streams={b}x{n}, bptt={self.bptt} ({kind}), batches={len(self)})"
