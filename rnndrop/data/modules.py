"""LightningDataModules for synthetic tasks, language-model corpora and pixel MNIST.

Each module exposes what a model needs to be built, under the same names everywhere:
``input_kind`` (``"tokens"`` or ``"float"``), ``vocab_size`` / ``input_size``, ``num_classes``
and ``output_size``, ``target`` (``"per_step"`` or ``"last"``), ``loss`` (``"cross_entropy"``
or ``"mse"``), ``baseline_loss`` (what a model without memory scores) and ``distance``. They
are available right after ``__init__`` (the language-model module reads its corpus on first
access), so a LightningCLI config can link them::

    parser.link_arguments("data.vocab_size", "model.vocab_size", apply_on="instantiate")

Batches are batch-first: ``x`` is ``(B, T)`` tokens or ``(B, T, F)`` floats; ``y`` is
``(B, T)`` with -100 where there is no target, or ``(B,)`` for ``target == "last"``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any, Literal

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from .batching import BPTTBatches, batchify
from .corpus import Corpus, load_ptb, load_text_folder, load_wikitext2
from .download import fetch
from .mnist import PixelMNIST
from .synthetic import TASKS, make_task
from .vocab import Vocab

__all__ = ["LanguageModelDataModule", "PixelMNISTDataModule", "SyntheticDataModule"]


def _rank_world(module: L.LightningDataModule) -> tuple[int, int]:
    trainer = module.trainer
    return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)


def _loader(dataset: Dataset, batch_size: int, num_workers: int, shuffle: bool, seed: int):
    # a seeded generator fixes the shuffle order (the sampler runs in the main process, so
    # the order does not depend on num_workers); under DDP Lightning swaps in a
    # DistributedSampler, which shards deterministically by rank.
    gen = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        generator=gen,
        persistent_workers=num_workers > 0,
    )


class EpochShuffle(torch.utils.data.Sampler[int]):
    """A shuffled order that is a function of ``(seed, epoch)`` alone, and can skip ahead.

    Pass ``e`` is the permutation a ``DataLoader(shuffle=True, generator=
    torch.Generator().manual_seed(seed))`` with ``num_workers=0`` gives in its ``e``-th pass
    (it draws a worker seed, then a ``randperm``, from that generator each pass), without
    needing the passes before it. :class:`ResumableLoader` sets ``epoch`` and ``skip``.
    """

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch, self.skip = n, seed, 0, 0
        self._gen: tuple[int, torch.Generator] | None = None  # (passes drawn, generator)

    def order(self, epoch: int) -> list[int]:
        """The permutation of pass ``epoch``."""
        if self._gen is None or self._gen[0] > epoch:  # first call, or back (a resume): replay
            self._gen = (0, torch.Generator().manual_seed(self.seed))
        done, gen = self._gen
        while True:
            torch.empty((), dtype=torch.int64).random_(generator=gen)  # DataLoader's worker seed
            perm = torch.randperm(self.n, generator=gen).tolist()
            done += 1
            if done > epoch:
                self._gen = (done, gen)
                return perm

    def __iter__(self) -> Iterator[int]:
        return iter(self.order(self.epoch)[self.skip :])

    def __len__(self) -> int:
        return self.n


class FreshEpochs(EpochShuffle):
    """:class:`EpochShuffle` over ``n`` items, shifted to items ``epoch * n ..`` of a stream:
    every epoch draws ``n`` sequences no earlier epoch drew (the unlimited data regime)."""

    def __iter__(self) -> Iterator[int]:
        offset = self.epoch * self.n
        return (offset + i for i in self.order(self.epoch)[self.skip :])


class ResumableLoader(DataLoader):
    """A shuffled training DataLoader whose position Lightning saves in checkpoints.

    Each ``iter()`` is the next pass (epoch) over the data, in :class:`EpochShuffle`'s order.
    Lightning stores ``state_dict()`` of every training loader that has one and hands it back
    on resume, so a run stopped mid-epoch continues with the batch it would have drawn next
    (same pass, same position) instead of restarting the epoch. Like
    :class:`~rnndrop.data.BPTTBatches` it counts its own passes rather than trusting the
    trainer's epoch, which Lightning advances when ``max_steps`` stops a run mid-epoch.
    """

    def __init__(
        self, dataset: Dataset, batch_size: int, num_workers: int, seed: int,
        order: EpochShuffle | None = None,
    ) -> None:  # fmt: skip
        self.order = order or EpochShuffle(len(dataset), seed)  # type: ignore[arg-type]
        super().__init__(
            dataset,
            batch_size=batch_size,
            sampler=self.order,
            num_workers=num_workers,
            # worker seeds from here, not from the global RNG that dropout masks use
            generator=torch.Generator().manual_seed(seed),
            persistent_workers=num_workers > 0,
        )
        self._epoch, self._yielded, self._resume = 0, 0, False

    def __iter__(self) -> Iterator[Any]:
        if not self._resume and self._yielded:  # a fresh iter() after a (broken-off) pass
            self._epoch, self._yielded = self._epoch + 1, 0
        self._resume = False
        self.order.epoch, self.order.skip = self._epoch, self._yielded * self.batch_size  # type: ignore[operator]
        for batch in super().__iter__():
            self._yielded += 1
            yield batch
        self._epoch, self._yielded, self._resume = self._epoch + 1, 0, True

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self._epoch, "batches": self._yielded, "size": self.order.n,
                "batch_size": self.batch_size}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, mine in (("size", self.order.n), ("batch_size", self.batch_size)):
            if state.get(key, mine) != mine:
                raise ValueError(
                    f"cannot resume the training data: the checkpoint has {key}={state[key]}, "
                    f"this data module {key}={mine} (resume with the same data settings)"
                )
        self._epoch, self._yielded, self._resume = int(state["epoch"]), int(state["batches"]), True


def _train_loader(module: L.LightningDataModule, dataset: Dataset) -> DataLoader:
    """The training loader: resumable mid-epoch, except where Lightning swaps the sampler.

    Under DDP (a ``DistributedSampler``: per-epoch order, a resume restarts the epoch) and
    with ``overfit_batches`` Lightning rebuilds the loader with its own sampler, which only a
    plain ``DataLoader`` allows.
    """
    bs, workers, seed = module.batch_size, module.num_workers, module.seed  # type: ignore[attr-defined]
    trainer = module.trainer
    epoch_size = getattr(module, "fresh_epoch_size", None)  # the unlimited regime
    if _rank_world(module)[1] > 1 or (trainer is not None and trainer.overfit_batches):
        if epoch_size is not None:
            raise ValueError(
                "train_size null (fresh sequences every epoch) runs in one process "
                "without overfit_batches: give a finite train_size under DDP"
            )
        return _loader(dataset, bs, workers, True, seed)
    order = None if epoch_size is None else FreshEpochs(epoch_size, seed)
    return ResumableLoader(dataset, bs, workers, seed, order)


class SyntheticDataModule(L.LightningDataModule):
    """A synthetic long-range task (see :mod:`rnndrop.data.synthetic`), generated on the fly.

    Args:
        task: a key of :data:`~rnndrop.data.synthetic.TASKS`: ``"copy"``, ``"adding"``,
            ``"delayed_recall"``, ``"associative_recall"`` or ``"selective_copy"``.
        distance: the task's dependency-distance knob (a list of distances for cued delayed
            recall).
        task_args: other constructor arguments of the task, e.g. ``{"n_symbols": 8}``.
        train_size, val_size, test_size: items per split (each split has its own data, seeded
            apart). ``train_size`` is the data regime: a fixed set of that many sequences,
            epochs over it; ``None``: unlimited data, every epoch ``epoch_size`` sequences no
            earlier epoch saw (nothing repeats, nothing can be memorised). Val and test are
            held-out sequences of the same distribution.
        epoch_size: sequences per epoch when ``train_size`` is None.
        batch_size: per device; ``eval_batch_size`` defaults to it.
        num_workers: DataLoader workers; the data do not depend on it.
        seed: data seed (each item is a function of seed, split and index) and shuffle seed.
    """

    def __init__(
        self,
        task: str = "copy",
        distance: int | list[int] = 100,
        task_args: dict[str, Any] | None = None,
        train_size: int | None = 10_000,
        val_size: int = 1_000,
        test_size: int = 1_000,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        epoch_size: int = 10_000,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if task not in TASKS:
            raise ValueError(f"task must be one of {sorted(TASKS)}, got {task!r}")
        kw = dict(task_args or {})
        # unlimited: a stream as long as any run (items are made on demand), read epoch by epoch
        self.fresh_epoch_size = None if train_size is not None else int(epoch_size)
        sizes = (("train", train_size if train_size is not None else 2**62),
                 ("val", val_size), ("test", test_size))  # fmt: skip
        self.datasets = {
            split: make_task(task, distance, size=size, seed=seed, split=split, **kw)
            for split, size in sizes
        }
        self.task = self.datasets["val"]  # for attributes and helpers such as distance_of
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.eval_batch_size = eval_batch_size or batch_size

    def train_dataloader(self) -> DataLoader:
        return _train_loader(self, self.datasets["train"])

    def val_dataloader(self) -> DataLoader:
        return _loader(self.datasets["val"], self.eval_batch_size, self.num_workers, False, 0)

    def test_dataloader(self) -> DataLoader:
        return _loader(self.datasets["test"], self.eval_batch_size, self.num_workers, False, 0)


def _from_task(name: str) -> property:
    return property(lambda self: getattr(self.task, name), doc=f"The task's ``{name}``.")


# input_kind, vocab_size, ... are the task's: known right after __init__
_TASK_ATTRS = ("input_kind", "vocab_size", "input_size", "num_classes", "output_size", "target",
               "loss", "baseline_loss", "distance", "seq_len", "name")  # fmt: skip
for _name in _TASK_ATTRS:
    setattr(SyntheticDataModule, _name, _from_task(_name))


class _Unsized:
    """BPTTBatches without ``__len__``, so Lightning runs each variable-length epoch to its end.

    Lightning takes ``len()`` once per fit and ends every epoch at that count, but variable
    chunk lengths change the count from epoch to epoch. Without a length Lightning keeps one
    batch prefetched, so the saved state is that of the batch before the newest one handed
    out: a resumed run starts with the batch that was waiting in the prefetch buffer.
    """

    def __init__(self, batches: BPTTBatches) -> None:
        self.batches = batches
        self._before: dict[str, Any] | None = None  # state before the newest batch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self._before = None
        for x, y in self.batches:
            state = self.batches.state_dict()
            self._before = dict(
                state, index=state["index"] - 1, position=state["position"] - x.shape[1]
            )
            yield x, y
        self._before = None  # the pass is over: everything was consumed

    def state_dict(self) -> dict[str, Any]:
        return self._before if self._before is not None else self.batches.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._before = None
        self.batches.load_state_dict(state)


class LanguageModelDataModule(L.LightningDataModule):
    """A word- or character-level corpus cut into contiguous truncated-BPTT chunks.

    Training yields the chunks of :class:`~rnndrop.data.batching.BPTTBatches` in order (never
    shuffled, so the model can carry its state), resumable mid-epoch through its
    ``state_dict``, which Lightning saves in checkpoints. The vocabulary is saved in the data
    module's own state: restoring a checkpoint checks that the ids have not shifted.

    With ``variable_bptt`` the train loader has no ``len()``: the number of chunks changes
    from epoch to epoch, and Lightning, which reads ``len()`` once, would cut later epochs
    short. Use an integer ``val_check_interval`` (or the default 1.0) with it.

    Under DDP each rank gets its own ``batch_size`` streams: the corpus is cut into
    ``batch_size x world_size`` streams and rank ``r`` takes block ``r``. The LM loaders run in
    the main process: a batch is a slice of an in-memory tensor, so workers would only add
    inter-process copies.

    Args:
        corpus: ``"ptb"``, ``"ptb_char"``, ``"wikitext2"`` or ``"folder"``.
        data_dir: for the named corpora, their directory or a root above it (see
            :func:`~rnndrop.data.download.fetch`; files are sha256-verified); for ``"folder"``,
            the directory with train/valid/test text files.
        batch_size: streams per device for training.
        eval_batch_size: streams per device for validation; ``test_batch_size`` defaults to it.
        bptt: steps per chunk (the mean with ``variable_bptt``).
        variable_bptt: AWD-LSTM's random chunk lengths, seeded by ``seed`` and the epoch.
        download: fetch missing files of a named corpus.
        tokenization, eos, unk_token: for ``"folder"`` (see
            :func:`~rnndrop.data.corpus.load_text_folder`); ``unk_token`` applies to all.
    """

    input_kind = "tokens"
    target = "per_step"
    loss = "cross_entropy"
    input_size = None
    distance = None

    def __init__(
        self,
        corpus: Literal["ptb", "ptb_char", "wikitext2", "folder"] = "ptb",
        data_dir: str | None = None,
        batch_size: int = 20,
        eval_batch_size: int = 10,
        test_batch_size: int | None = None,
        bptt: int = 35,
        variable_bptt: bool = False,
        download: bool = False,
        seed: int = 0,
        tokenization: Literal["word", "char"] = "word",
        eos: bool | str = True,
        unk_token: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if corpus not in ("ptb", "ptb_char", "wikitext2", "folder"):
            raise ValueError(f"corpus must be ptb, ptb_char, wikitext2 or folder, got {corpus!r}")
        if corpus == "folder" and data_dir is None:
            raise ValueError("corpus='folder' needs data_dir, the directory with the text files")
        self.corpus_name, self.data_dir, self.download = corpus, data_dir, download
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.test_batch_size = test_batch_size or eval_batch_size
        self.bptt, self.variable_bptt, self.seed = bptt, variable_bptt, seed
        self._corpus: Corpus | None = None
        self._saved_vocab: Vocab | None = None
        self.train_batches: BPTTBatches | None = None

    # data ------------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        if self.corpus_name != "folder" and self.download:
            fetch(self.corpus_name, self.data_dir, download=True)

    @property
    def corpus(self) -> Corpus:
        """The loaded corpus (read on first access)."""
        if self._corpus is None:
            hp = self.hparams
            if self.corpus_name == "folder":
                corpus = load_text_folder(
                    self.data_dir, hp.tokenization, eos=hp.eos, unk_token=hp.unk_token
                )
            else:
                root = fetch(self.corpus_name, self.data_dir, download=self.download, verbose=True)
                if self.corpus_name == "wikitext2":
                    corpus = load_wikitext2(root, unk_token=hp.unk_token)
                else:
                    level = "char" if self.corpus_name == "ptb_char" else "word"
                    corpus = load_ptb(root, level, unk_token=hp.unk_token)
            self._check_vocab(corpus.vocab)
            self._corpus = corpus
        return self._corpus

    @property
    def vocab(self) -> Vocab:
        return self.corpus.vocab

    @property
    def vocab_size(self) -> int:
        return len(self.corpus.vocab)

    @property
    def num_classes(self) -> int:
        return self.vocab_size

    @property
    def output_size(self) -> int:
        return self.vocab_size

    @property
    def baseline_loss(self) -> float:
        """Cross-entropy on valid of the train unigram distribution (add-one smoothed): the
        best a model that ignores all context can do, up to the smoothing."""
        counts = torch.bincount(self.corpus.train, minlength=self.vocab_size).double() + 1.0
        logp = counts.log() - counts.sum().log()
        return float(-logp[self.corpus.valid].mean())

    def setup(self, stage: str | None = None) -> None:
        self.corpus  # noqa: B018  (load, and check the vocabulary against a checkpoint)

    # loaders ---------------------------------------------------------------------------------
    def _batches(self, split: str, batch_size: int, train: bool = False) -> BPTTBatches:
        rank, world = _rank_world(self)
        streams = batchify(self.corpus[split], batch_size * world)  # (B * world, N)
        return BPTTBatches(
            streams,
            self.bptt,
            variable=train and self.variable_bptt,
            seed=self.seed,
            rank=rank,
            world_size=world,
        )

    def train_dataloader(self) -> BPTTBatches | _Unsized:
        self.train_batches = self._batches("train", self.batch_size, train=True)
        # variable lengths change the number of chunks every epoch, but Lightning takes len()
        # once and would end later epochs at the first one's count: give it no len() instead
        return _Unsized(self.train_batches) if self.variable_bptt else self.train_batches

    def val_dataloader(self) -> BPTTBatches:
        return self._batches("valid", self.eval_batch_size)

    def test_dataloader(self) -> BPTTBatches:
        return self._batches("test", self.test_batch_size)

    # checkpoints -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"vocab": self.vocab.state_dict()} if self._corpus is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "vocab" in state_dict:
            self._saved_vocab = Vocab.from_state_dict(state_dict["vocab"])
            if self._corpus is not None:
                self._check_vocab(self._corpus.vocab)

    def _check_vocab(self, vocab: Vocab) -> None:
        saved = self._saved_vocab
        if saved is not None and saved != vocab:
            diff = next(
                (i for i, (a, b) in enumerate(zip(saved.itos, vocab.itos, strict=False)) if a != b),
                min(len(saved), len(vocab)),
            )
            raise ValueError(
                f"the checkpoint's vocabulary ({len(saved)} tokens) differs from the one built "
                f"from the {self.corpus_name} data ({len(vocab)} tokens), first at id {diff}: "
                "token ids would shift. Use the same corpus files and unk_token as the run "
                "that wrote the checkpoint"
            )


class PixelMNISTDataModule(L.LightningDataModule):
    """Sequential or permuted pixel MNIST (see :class:`~rnndrop.data.mnist.PixelMNIST`).

    The 60,000 training images are split once, by a permutation seeded with ``seed``, into
    ``60000 - val_size`` for training and ``val_size`` for validation; test is the 10,000
    test images.

    Args:
        data_dir: the MNIST directory or a root above it (sha256-verified, see
            :func:`~rnndrop.data.download.fetch`).
        permuted, rows, perm_seed: as in :class:`~rnndrop.data.mnist.PixelMNIST`.
        batch_size: per device; ``eval_batch_size`` defaults to it.
        val_size: training images held out for validation.
        num_workers: DataLoader workers.
        seed: train/val split and shuffle seed.
        download: fetch missing files.
    """

    input_kind = "float"
    vocab_size = None
    num_classes = 10
    output_size = 10
    target = "last"
    loss = "cross_entropy"
    baseline_loss = math.log(10)

    def __init__(
        self,
        data_dir: str | None = None,
        permuted: bool = False,
        rows: bool = False,
        perm_seed: int = 0,
        batch_size: int = 100,
        eval_batch_size: int | None = None,
        val_size: int = 5_000,
        num_workers: int = 0,
        seed: int = 0,
        download: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.data_dir, self.download = data_dir, download
        self.permuted, self.rows, self.perm_seed = permuted, rows, perm_seed
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.val_size, self.num_workers, self.seed = val_size, num_workers, seed
        self.input_size = 28 if rows else 1
        self.seq_len = self.distance = 28 if rows else 784
        self.datasets: dict[str, PixelMNIST] = {}

    def prepare_data(self) -> None:
        if self.download:
            fetch("mnist", self.data_dir, download=True)

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        root = fetch("mnist", self.data_dir, download=self.download)
        kw = {"permuted": self.permuted, "rows": self.rows, "perm_seed": self.perm_seed}
        n = len(PixelMNIST(root, "train", **kw))
        if not 0 <= self.val_size < n:
            raise ValueError(f"val_size must be in [0, {n}), got {self.val_size}")
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))
        val, train = order[: self.val_size].sort().values, order[self.val_size :].sort().values
        self.datasets = {
            "train": PixelMNIST(root, "train", indices=train, **kw),
            "val": PixelMNIST(root, "train", indices=val, **kw),
            "test": PixelMNIST(root, "test", **kw),
        }

    def train_dataloader(self) -> DataLoader:
        return _train_loader(self, self.datasets["train"])

    def val_dataloader(self) -> DataLoader:
        return _loader(self.datasets["val"], self.eval_batch_size, self.num_workers, False, 0)

    def test_dataloader(self) -> DataLoader:
        return _loader(self.datasets["test"], self.eval_batch_size, self.num_workers, False, 0)
