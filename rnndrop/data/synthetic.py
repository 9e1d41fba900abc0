"""Synthetic long-range tasks whose dependency distance is a knob.

Every task is a map-style :class:`torch.utils.data.Dataset` of a fixed ``size``. Item ``i`` is
generated on the fly from a ``torch.Generator`` seeded by ``(task, seed, split, i)`` alone, so
the same seed gives the same data in any process, with any number of DataLoader workers and
any DDP sharding, and splits (``"train"``, ``"val"``, ``"test"``) never share a seed.

Conventions for an item ``(x, y)``:

- ``x``: LongTensor ``(T,)`` of tokens (``input_kind == "tokens"``) or float ``(T, F)``
  (``input_kind == "float"``).
- ``target == "per_step"``: ``y`` is a LongTensor ``(T,)``, ``-100`` (ignored by
  ``cross_entropy``) where there is nothing to predict.
- ``target == "last"``: the model answers after the last step; ``y`` is a scalar, a class
  (LongTensor) for ``loss == "cross_entropy"`` or a value (float) for ``loss == "mse"``.

Each task also knows ``vocab_size`` / ``input_size``, ``num_classes`` / ``output_size``,
``distance`` (its knob), ``seq_len``, and ``baseline_loss``: the loss of the best predictor
that remembers nothing (it may know the position ``t``, not the inputs it has seen).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor
from torch.utils.data import Dataset

__all__ = [
    "TASKS",
    "AddingTask",
    "AssociativeRecall",
    "CopyTask",
    "DelayedRecall",
    "SelectiveCopy",
    "SyntheticTask",
    "make_task",
]

IGNORE = -100  # cross_entropy's default ignore_index


def item_seed(*parts: Any) -> int:
    """A 63-bit seed from a tuple of values (stable across processes and Python runs)."""
    key = "/".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


def _positive(name: str, value: int, minimum: int = 1) -> int:
    if isinstance(value, bool) or int(value) != value or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


class SyntheticTask(Dataset):
    """Base of the synthetic tasks: seeding, indexing and the task attributes.

    Args:
        size: number of items.
        seed: data seed; item ``i`` depends on ``(name, seed, split, i)`` only.
        split: any string; ``"train"``, ``"val"`` and ``"test"`` are the usual ones.
    """

    name: ClassVar[str]
    input_kind: ClassVar[Literal["tokens", "float"]]
    target: ClassVar[Literal["per_step", "last"]]
    loss: ClassVar[Literal["cross_entropy", "mse"]]
    vocab_size: int | None = None
    input_size: int | None = None
    num_classes: int | None = None
    distance: int
    seq_len: int

    def __init__(self, *, size: int = 10_000, seed: int = 0, split: str = "train") -> None:
        self.size = _positive("size", size)
        self.seed, self.split = int(seed), str(split)

    @property
    def output_size(self) -> int:
        """Width of the model's output layer: ``num_classes``, or 1 for regression."""
        return self.num_classes if self.num_classes is not None else 1

    @property
    def baseline_loss(self) -> float:
        raise NotImplementedError

    def __len__(self) -> int:
        return self.size

    def generator(self, index: int) -> torch.Generator:
        """The generator item ``index`` is drawn from."""
        return torch.Generator().manual_seed(item_seed(self.name, self.seed, self.split, index))

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        if not -self.size <= index < self.size:
            raise IndexError(f"index {index} out of range for {self.name} of size {self.size}")
        return self.generate(self.generator(index % self.size))

    def generate(self, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def memory_mask(self, y: Tensor) -> Tensor:
        """Targets that test memory (where accuracy is reported): every target by default.

        Shape:
            ``y`` as the task's targets -> bool of the same shape.
        """
        return y != IGNORE if y.dtype == torch.long else torch.ones_like(y, dtype=torch.bool)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(distance={self.distance}, size={self.size}, "
            f"seed={self.seed}, split={self.split!r})"
        )


class CopyTask(SyntheticTask):
    r"""Copy memory (Hochreiter & Schmidhuber 1997; the form of Arjovsky et al. 2016).

    Tokens: 0 blank, ``1..n_symbols`` data, ``n_symbols + 1`` delimiter. With ``T = distance``
    and ``K = n_copy``, length ``T + 2K``::

        x = s_1..s_K, 0 * (T-1), delimiter, 0 * K
        y = 0 * (T+K),                      s_1..s_K

    A model that remembers nothing predicts blank for the first ``T + K`` steps (certain, so
    zero loss) and a uniform symbol for the last ``K``: cross-entropy
    ``K ln(n_symbols) / (T + 2K)`` per step, ``10 ln 8 / (T + 20)`` by default. The delimiter is
    never a target, so ``num_classes = n_symbols + 1``.

    Args:
        distance: the delay ``T`` (>= 1); symbol ``i`` is recalled ``T + K`` steps later.
        n_symbols: size of the data alphabet.
        n_copy: symbols to copy, ``K``.
    """

    name = "copy"
    input_kind = "tokens"
    target = "per_step"
    loss = "cross_entropy"

    def __init__(self, distance: int = 100, n_symbols: int = 8, n_copy: int = 10, **kw: Any):
        super().__init__(**kw)
        self.distance = _positive("distance", distance)
        self.n_symbols = _positive("n_symbols", n_symbols, 2)
        self.n_copy = _positive("n_copy", n_copy)
        self.seq_len = self.distance + 2 * self.n_copy
        self.vocab_size = self.n_symbols + 2
        self.num_classes = self.n_symbols + 1
        self.delimiter = self.n_symbols + 1

    @property
    def baseline_loss(self) -> float:
        return self.n_copy * math.log(self.n_symbols) / self.seq_len

    def memory_mask(self, y: Tensor) -> Tensor:
        """Only the last ``K`` steps, the recalled symbols (the blanks before are certain)."""
        steps = torch.arange(y.shape[-1], device=y.device)
        return (steps >= self.distance + self.n_copy).expand_as(y)

    def generate(self, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        k, t = self.n_copy, self.distance
        symbols = torch.randint(1, self.n_symbols + 1, (k,), generator=gen)
        x = torch.zeros(self.seq_len, dtype=torch.long)
        x[:k] = symbols
        x[k + t - 1] = self.delimiter
        y = torch.zeros(self.seq_len, dtype=torch.long)
        y[t + k :] = symbols
        return x, y


class AddingTask(SyntheticTask):
    r"""Adding problem (Hochreiter & Schmidhuber 1997; the form of Le et al. 2015).

    ``x[t] = (u_t, m_t)`` with ``u_t ~ U[0, 1]`` i.i.d. and ``m_t`` 1 at exactly two steps;
    ``y = sum_t u_t m_t`` (a float, read after the last step). ``markers="halves"`` puts one
    marker uniformly in ``[0, T//2)`` and one in ``[T//2, T)``; ``"anywhere"`` picks two distinct
    steps uniformly.

    Baseline: the marked values are i.i.d. U[0, 1] whatever the markers, so the best constant
    (predict 1) has MSE ``Var(u_1 + u_2) = 2/12 = 1/6`` exactly, for both marker schemes. A model
    that sees only the last input does a little better, because the last step is marked with
    probability ``2/T`` in both schemes: ``1/6 - 1/(6T)``. ``baseline_loss`` is 1/6.

    Args:
        distance: sequence length ``T`` (>= 2).
        markers: ``"halves"`` or ``"anywhere"``.
    """

    name = "adding"
    input_kind = "float"
    target = "last"
    loss = "mse"

    def __init__(
        self, distance: int = 100, markers: Literal["halves", "anywhere"] = "halves", **kw: Any
    ):
        super().__init__(**kw)
        if markers not in ("halves", "anywhere"):
            raise ValueError(f"markers must be 'halves' or 'anywhere', got {markers!r}")
        self.distance = self.seq_len = _positive("distance", distance, 2)
        self.markers = markers
        self.input_size = 2

    @property
    def baseline_loss(self) -> float:
        return 1.0 / 6.0

    def generate(self, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        t = self.distance
        values = torch.rand(t, generator=gen)
        if self.markers == "halves":
            first = torch.randint(0, t // 2, (), generator=gen)
            second = torch.randint(t // 2, t, (), generator=gen)
            idx = torch.stack([first, second])
        else:
            idx = torch.randperm(t, generator=gen)[:2]
        marks = torch.zeros(t)
        marks[idx] = 1.0
        return torch.stack([values, marks], dim=-1), values[idx].sum()  # (T, 2), ()


class DelayedRecall(SyntheticTask):
    r"""Delayed recall: output the token seen ``d`` steps ago.

    ``x_t`` uniform over ``n_symbols`` tokens; ``y_t = x_{t-d}`` for ``t >= d`` and ``-100``
    before, so per-step accuracy is accuracy at distance ``d``. Memoryless cross-entropy:
    ``ln(n_symbols)`` (chance accuracy ``1 / n_symbols``).

    Several distances in one sequence (``distance`` a list ``d_1..d_K``): cue tokens
    ``n_symbols + k`` ask "what was the data token ``d_k`` steps before this one?". Each step
    ``t`` becomes a cue with probability ``cue_rate`` (its ``k`` uniform), unless ``t < d_k`` or
    the token at ``t - d_k`` is itself a cue; only cue steps have targets. Group accuracy by
    :meth:`distance_of` to read accuracy against distance off one run.

    Args:
        distance: ``d`` (>= 1), or a list of distances for the cued mode.
        n_symbols: data alphabet size (= ``num_classes``).
        length: sequence length; default ``max distance + 50``.
        cue_rate: fraction of steps that are cues in the cued mode.
    """

    name = "delayed_recall"
    input_kind = "tokens"
    target = "per_step"
    loss = "cross_entropy"

    def __init__(
        self,
        distance: int | Sequence[int] = 10,
        n_symbols: int = 8,
        length: int | None = None,
        cue_rate: float = 0.1,
        **kw: Any,
    ):
        super().__init__(**kw)
        cued = not isinstance(distance, int)
        dists = [distance] if not cued else list(distance)  # type: ignore[list-item]
        if not dists:
            raise ValueError("distance: give at least one distance")
        self.distances = tuple(_positive("distance", d) for d in dists)
        self.cued = cued
        self.distance = max(self.distances)
        self.n_symbols = _positive("n_symbols", n_symbols, 2)
        self.seq_len = self.distance + 50 if length is None else _positive("length", length)
        if self.seq_len <= self.distance:
            raise ValueError(f"length ({self.seq_len}) must exceed the distance ({self.distance})")
        if cued and not 0.0 < cue_rate <= 1.0:
            raise ValueError(f"cue_rate must be in (0, 1], got {cue_rate}")
        self.cue_rate = cue_rate
        self.vocab_size = self.n_symbols + (len(self.distances) if cued else 0)
        self.num_classes = self.n_symbols

    @property
    def baseline_loss(self) -> float:
        return math.log(self.n_symbols)

    def generate(self, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        x = torch.randint(0, self.n_symbols, (self.seq_len,), generator=gen)
        y = torch.full_like(x, IGNORE)
        if not self.cued:
            d = self.distance
            y[d:] = x[:-d]
            return x, y
        cue = torch.rand(self.seq_len, generator=gen) < self.cue_rate
        which = torch.randint(0, len(self.distances), (self.seq_len,), generator=gen)
        for t in cue.nonzero().flatten().tolist():  # left to right: earlier cues are final
            k = int(which[t])
            src = t - self.distances[k]
            if src >= 0 and x[src] < self.n_symbols:
                y[t] = x[src]
                x[t] = self.n_symbols + k
        return x, y

    def distance_of(self, x: Tensor) -> Tensor:
        """The recall distance each step of ``x`` is asked for (0 where there is no target).

        Shape:
            ``(*, T)`` -> ``(*, T)``, for one item or a batch.
        """
        if not self.cued:
            t = torch.arange(x.shape[-1], device=x.device)
            return torch.where(t >= self.distance, self.distance, 0).expand_as(x)
        table = torch.tensor((0,) * self.n_symbols + self.distances, device=x.device)
        return table[x]


class AssociativeRecall(SyntheticTask):
    r"""Associative recall: hold ``K`` key-value pairs at once, then return the value of a key.

    Stresses capacity and content-based lookup rather than the length of one delay (Graves et
    al. 2014; Ba et al. 2016). Keys are distinct tokens ``0..n_keys-1``, values
    ``n_keys..n_keys+n_values-1``, then a separator and a query (one of the keys)::

        x = k_1 v_1 k_2 v_2 ... k_K v_K SEP q    (length 2K + 2)
        y = index (0..n_values-1) of the value paired with q, read after the last step

    The queried pair is uniform, so the lag from its value to the answer is 3, 5, .., 2K+1.
    Memoryless cross-entropy: ``ln(n_values)``.

    Args:
        distance: number of pairs ``K`` (the knob).
        n_keys: key alphabet (>= K); default ``max(26, K)``.
        n_values: value alphabet (= ``num_classes``).
    """

    name = "associative_recall"
    input_kind = "tokens"
    target = "last"
    loss = "cross_entropy"

    def __init__(
        self, distance: int = 10, n_keys: int | None = None, n_values: int = 10, **kw: Any
    ):
        super().__init__(**kw)
        self.distance = _positive("distance", distance)
        self.n_keys = max(26, self.distance) if n_keys is None else _positive("n_keys", n_keys)
        if self.n_keys < self.distance:
            raise ValueError(f"n_keys ({self.n_keys}) must be >= the number of pairs ({distance})")
        self.n_values = _positive("n_values", n_values, 2)
        self.seq_len = 2 * self.distance + 2
        self.vocab_size = self.n_keys + self.n_values + 1
        self.num_classes = self.n_values
        self.separator = self.n_keys + self.n_values

    @property
    def baseline_loss(self) -> float:
        return math.log(self.n_values)

    def generate(self, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        k = self.distance
        keys = torch.randperm(self.n_keys, generator=gen)[:k]
        values = torch.randint(0, self.n_values, (k,), generator=gen)
        query = int(torch.randint(0, k, (), generator=gen))
        x = torch.empty(self.seq_len, dtype=torch.long)
        x[0 : 2 * k : 2] = keys
        x[1 : 2 * k : 2] = values + self.n_keys
        x[-2], x[-1] = self.separator, keys[query]
        return x, values[query].clone()


class SelectiveCopy(SyntheticTask):
    r"""Selective copying (Gu & Dao 2023): K data tokens scattered among random noise tokens,
    reproduced in order at the end.

    Unlike :class:`CopyTask`, where the data sit at fixed positions before blanks, here the
    positions are random and the gap holds *random* tokens: the model must pick the data out
    by content and ignore the noise, not merely hold its state through blanks. Tokens:
    ``0..n_symbols-1`` data, ``n_symbols..n_symbols+n_noise-1`` noise, then a delimiter and a
    blank. With ``T = distance`` and ``K = n_copy``, length ``T + 1 + K``::

        x = T tokens (K data at sorted random positions, noise elsewhere), delimiter, blank * K
        y = -100 * (T + 1),                                                 data_1..data_K

    Only the last ``K`` steps have targets (classes ``0..n_symbols-1``). The first data token
    is recalled up to ``T + K`` steps later. A model that remembers nothing predicts a uniform
    symbol: cross-entropy ``ln(n_symbols)``, accuracy ``1 / n_symbols``.

    Args:
        distance: length ``T`` of the noisy region that holds the data (>= ``n_copy``).
        n_symbols: data alphabet (= ``num_classes``).
        n_copy: data tokens to reproduce, ``K``.
        n_noise: noise alphabet (1: one filler token, the blank-like form of the task).
    """

    name = "selective_copy"
    input_kind = "tokens"
    target = "per_step"
    loss = "cross_entropy"

    def __init__(
        self, distance: int = 50, n_symbols: int = 8, n_copy: int = 4, n_noise: int = 8,
        **kw: Any,
    ):  # fmt: skip
        super().__init__(**kw)
        self.distance = _positive("distance", distance)
        self.n_symbols = _positive("n_symbols", n_symbols, 2)
        self.n_copy = _positive("n_copy", n_copy)
        self.n_noise = _positive("n_noise", n_noise)
        if self.n_copy > self.distance:
            raise ValueError(f"n_copy ({self.n_copy}) must be <= the distance ({self.distance}): "
                             "the data sit among the distance's noisy steps")  # fmt: skip
        self.seq_len = self.distance + 1 + self.n_copy
        self.delimiter = self.n_symbols + self.n_noise
        self.blank = self.delimiter + 1
        self.vocab_size = self.n_symbols + self.n_noise + 2
        self.num_classes = self.n_symbols

    @property
    def baseline_loss(self) -> float:
        return math.log(self.n_symbols)

    def generate(self, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        k, t = self.n_copy, self.distance
        x = torch.randint(self.n_symbols, self.n_symbols + self.n_noise, (self.seq_len,),
                          generator=gen)  # fmt: skip
        where = torch.randperm(t, generator=gen)[:k].sort().values
        data = torch.randint(0, self.n_symbols, (k,), generator=gen)
        x[where] = data
        x[t] = self.delimiter
        x[t + 1 :] = self.blank
        y = torch.full((self.seq_len,), IGNORE, dtype=torch.long)
        y[t + 1 :] = data
        return x, y


TASKS: dict[str, type[SyntheticTask]] = {
    "copy": CopyTask,
    "adding": AddingTask,
    "delayed_recall": DelayedRecall,
    "associative_recall": AssociativeRecall,
    "selective_copy": SelectiveCopy,
}


def make_task(name: str, distance: Any, **kwargs: Any) -> SyntheticTask:
    """Build a task by name (a key of :data:`TASKS`); ``kwargs`` go to its constructor."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {sorted(TASKS)}")
    return TASKS[name](distance, **kwargs)
