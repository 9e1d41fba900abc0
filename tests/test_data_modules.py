import gzip
import math
import random
import warnings
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from rnndrop.data import (
    BPTTBatches,
    LanguageModelDataModule,
    PixelMNISTDataModule,
    SyntheticDataModule,
)


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module="lightning")
        yield


# synthetic --------------------------------------------------------------------------------------
def test_synthetic_attributes_right_after_init():
    dm = SyntheticDataModule("copy", distance=30, batch_size=4)
    assert (dm.input_kind, dm.vocab_size, dm.num_classes, dm.output_size) == ("tokens", 10, 9, 9)
    assert (dm.target, dm.loss, dm.distance, dm.seq_len) == ("per_step", "cross_entropy", 30, 50)
    assert dm.baseline_loss == pytest.approx(10 * math.log(8) / 50)
    dm = SyntheticDataModule("adding", distance=20, task_args={"markers": "anywhere"})
    assert (dm.input_kind, dm.input_size, dm.vocab_size, dm.output_size) == ("float", 2, None, 1)
    assert (dm.target, dm.loss, dm.baseline_loss) == ("last", "mse", 1 / 6)


@pytest.mark.parametrize(
    ("task", "x_shape", "y_shape"),
    [
        ("copy", (4, 25), (4, 25)),
        ("adding", (4, 5, 2), (4,)),
        ("delayed_recall", (4, 55), (4, 55)),
        ("associative_recall", (4, 12), (4,)),
    ],
)
def test_synthetic_batches_are_batch_first(task, x_shape, y_shape):
    dm = SyntheticDataModule(task, distance=5, batch_size=4, train_size=8, val_size=8)
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == x_shape and y.shape == y_shape


def test_synthetic_same_batches_with_workers():
    def batches(workers):
        dm = SyntheticDataModule(
            "delayed_recall", distance=3, train_size=20, val_size=10, batch_size=4,
            num_workers=workers, seed=9,
        )  # fmt: skip
        return [b for loader in (dm.train_dataloader(), dm.val_dataloader()) for b in loader]

    zero, two = batches(0), batches(2)
    assert len(zero) == len(two) == 8
    for (x0, y0), (x2, y2) in zip(zero, two, strict=True):
        assert torch.equal(x0, x2) and torch.equal(y0, y2)
    first = batches(0)[0][0]  # the shuffle order is seeded too
    assert torch.equal(first, zero[0][0])


def test_epoch_shuffle_is_the_dataloader_order_but_a_function_of_the_epoch():
    from rnndrop.data.modules import EpochShuffle, ResumableLoader

    data = list(range(10))
    gen = torch.Generator().manual_seed(3)
    plain = DataLoader(data, batch_size=10, shuffle=True, generator=gen)
    passes = [next(iter(plain)).tolist() for _ in range(4)]  # what training used to see
    assert len({tuple(p) for p in passes}) == 4
    order = EpochShuffle(10, 3)
    assert [order.order(e) for e in range(4)] == passes
    assert EpochShuffle(10, 3).order(3) == passes[3]  # no history needed
    assert order.order(1) == passes[1]  # and going back works

    loader = ResumableLoader(data, batch_size=4, num_workers=0, seed=3)
    assert [torch.cat(list(loader)).tolist() for _ in range(2)] == passes[:2]
    it = iter(loader)  # pass 2
    assert next(it).tolist() == passes[2][:4]
    state = loader.state_dict()
    assert state["epoch"] == 2 and state["batches"] == 1
    again = ResumableLoader(data, batch_size=4, num_workers=0, seed=3)
    again.load_state_dict(state)
    assert [b.tolist() for b in again] == [passes[2][4:8], passes[2][8:]]
    assert again.state_dict() == dict(state, epoch=3, batches=0)
    assert torch.cat(list(again)).tolist() == passes[3]
    with pytest.raises(ValueError, match=r"batch_size=5.*batch_size=4"):
        again.load_state_dict(dict(state, batch_size=5))


# language model ---------------------------------------------------------------------------------
@pytest.fixture
def text_dir(tmp_path):
    rng = random.Random(0)
    for split, lines in (("train", 300), ("valid", 40), ("test", 40)):
        text = "\n".join(" ".join(rng.choice("abcdefgh") for _ in range(9)) for _ in range(lines))
        (tmp_path / f"{split}.txt").write_text(text + "\n")
    return tmp_path


def test_lm_attributes_and_baseline(text_dir):
    dm = LanguageModelDataModule("folder", data_dir=str(text_dir), batch_size=4, bptt=10)
    assert dm.vocab_size == 9 and dm.num_classes == 9  # 8 letters + <eos>, loaded on access
    assert (dm.input_kind, dm.target, dm.loss) == ("tokens", "per_step", "cross_entropy")
    train = (text_dir / "train.txt").read_text().replace("\n", " <eos> ").split()
    valid = (text_dir / "valid.txt").read_text().replace("\n", " <eos> ").split()
    counts = Counter(train)
    total = len(train) + len(counts)
    expected = -sum(math.log((counts[w] + 1) / total) for w in valid) / len(valid)
    assert dm.baseline_loss == pytest.approx(expected, rel=1e-9)


def test_lm_train_batches_contiguous_in_order(text_dir):
    dm = LanguageModelDataModule("folder", data_dir=str(text_dir), batch_size=4, bptt=10)
    dm.setup("fit")
    ids = dm.corpus.train
    xs = [x for x, _ in dm.train_dataloader()]
    n = len(ids) // 4
    assert torch.equal(torch.cat(xs, 1), ids[: 4 * n].view(4, n)[:, :-1])
    assert all(x.shape[1] == 10 for x in xs[:-1])
    val = list(dm.val_dataloader())
    assert val[0][0].shape[0] == 10  # eval_batch_size


def test_lm_ddp_each_rank_its_own_streams(text_dir):
    ranks = []
    for rank in range(2):
        dm = LanguageModelDataModule("folder", data_dir=str(text_dir), batch_size=3, bptt=8)
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=2)
        ranks.append(list(dm.train_dataloader()))
    assert len(ranks[0]) == len(ranks[1])
    ids = dm.corpus.train
    n = len(ids) // 6
    streams = ids[: 6 * n].view(6, n)  # batch_size x world_size streams
    assert torch.equal(torch.cat([x for x, _ in ranks[0]], 1), streams[:3, :-1])
    assert torch.equal(torch.cat([x for x, _ in ranks[1]], 1), streams[3:, :-1])


def test_lm_vocab_checked_against_checkpoint(text_dir, tmp_path):
    dm = LanguageModelDataModule("folder", data_dir=str(text_dir))
    state = dm.state_dict() or {"vocab": dm.vocab.state_dict()}
    other = LanguageModelDataModule("folder", data_dir=str(text_dir))
    other.load_state_dict(state)
    other.setup("fit")  # same vocabulary: fine
    shifted = dict(state["vocab"], itos=list(reversed(state["vocab"]["itos"])))
    other = LanguageModelDataModule("folder", data_dir=str(text_dir))
    other.load_state_dict({"vocab": shifted})
    with pytest.raises(ValueError, match="token ids would shift"):
        other.setup("fit")


def test_lm_named_corpus_missing(tmp_path):
    dm = LanguageModelDataModule("ptb", data_dir=str(tmp_path))
    with pytest.raises(Exception, match=r"missing ptb\.train\.txt.*ptb\.test\.txt in .*ptb"):
        dm.setup("fit")
    with pytest.raises(ValueError, match="needs data_dir"):
        LanguageModelDataModule("folder")


class TinyLM(L.LightningModule):
    def __init__(self, vocab_size: int = 2, baseline_loss: float = 0.0):
        super().__init__()
        self.save_hyperparameters()
        self.emb = torch.nn.Embedding(vocab_size, 4)
        self.out = torch.nn.Linear(4, vocab_size)
        self.seen: list[torch.Tensor] = []
        self.val_batches = 0

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.seen.append(x.clone())
        return torch.nn.functional.cross_entropy(self.out(self.emb(x)).flatten(0, 1), y.flatten())

    def validation_step(self, batch, batch_idx):
        self.val_batches += 1

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("variable", [False, True])  # sized and unsized train loaders
def test_lm_resume_mid_epoch_in_lightning(text_dir, tmp_path, variable):
    def fit(max_steps, ckpt=None, save=None):
        dm = LanguageModelDataModule(
            "folder", data_dir=str(text_dir), batch_size=4, bptt=12, variable_bptt=variable
        )
        model = TinyLM(dm.vocab_size)
        trainer = L.Trainer(
            max_steps=max_steps, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        )  # fmt: skip
        trainer.fit(model, dm, ckpt_path=ckpt)
        if save:
            trainer.save_checkpoint(save)
        return model.seen

    full = fit(10)
    first = fit(4, save=tmp_path / "mid.ckpt")
    rest = fit(10, ckpt=tmp_path / "mid.ckpt")
    assert len(first) == 4 and len(first) + len(rest) == len(full)
    assert all(torch.equal(a, b) for a, b in zip(first + rest, full, strict=True))


def test_lm_variable_epochs_run_to_their_end(text_dir):
    # variable lengths give each epoch its own number of chunks; none may be cut short
    dm = LanguageModelDataModule(
        "folder", data_dir=str(text_dir), batch_size=4, bptt=6, variable_bptt=True, seed=3
    )
    model = TinyLM(dm.vocab_size)
    trainer = L.Trainer(
        max_epochs=4, logger=False, enable_checkpointing=False, num_sanity_val_steps=0,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(model, dm)
    ids = dm.corpus.train
    n = len(ids) // 4
    expected = BPTTBatches(ids[: 4 * n].view(4, n), 6, variable=True, seed=3)
    counts = [len(expected.lengths(e)) for e in range(4)]
    assert len(set(counts)) > 1  # the test needs epochs of different lengths
    assert [x.shape[1] for x in model.seen] == [n for e in range(4) for n in expected.lengths(e)]
    assert model.val_batches == 4 * len(dm.val_dataloader())  # validated after every epoch


def test_lightning_cli_links_data_attributes(text_dir):
    from lightning.pytorch.cli import LightningCLI

    class CLI(LightningCLI):
        def add_arguments_to_parser(self, parser):
            parser.link_arguments("data.vocab_size", "model.vocab_size", apply_on="instantiate")
            parser.link_arguments(
                "data.baseline_loss", "model.baseline_loss", apply_on="instantiate"
            )

    kw = {"run": False, "save_config_callback": None, "trainer_defaults": {"logger": False}}
    cli = CLI(TinyLM, SyntheticDataModule, args=["--data.task=copy", "--data.distance=7"], **kw)
    assert cli.model.hparams.vocab_size == 10
    assert cli.model.hparams.baseline_loss == pytest.approx(10 * math.log(8) / 27)
    args = ["--data.corpus=folder", f"--data.data_dir={text_dir}", "--data.bptt=5"]
    cli = CLI(TinyLM, LanguageModelDataModule, args=args, **kw)
    assert cli.model.hparams.vocab_size == 9


# pixel MNIST ------------------------------------------------------------------------------------
def write_fake_mnist(root: Path, n_train=40, n_test=10):
    import struct

    root.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8)
        labels = (torch.arange(n) % 10).to(torch.uint8)
        for kind, arr, magic in (("images-idx3", images, 2051), ("labels-idx1", labels, 2049)):
            header = struct.pack(">i", magic) + b"".join(struct.pack(">i", s) for s in arr.shape)
            data = gzip.compress(header + arr.numpy().tobytes())
            (root / f"{prefix}-{kind}-ubyte.gz").write_bytes(data)


def test_mnist_module(tmp_path, monkeypatch):
    write_fake_mnist(tmp_path / "mnist")
    # the fake files are not the registry's: skip the sha256 check for this test only
    monkeypatch.setattr("rnndrop.data.modules.fetch", lambda name, d, download=False: Path(d))
    dm = PixelMNISTDataModule(str(tmp_path / "mnist"), permuted=True, val_size=10, batch_size=8)
    assert (dm.input_kind, dm.input_size, dm.num_classes, dm.seq_len) == ("float", 1, 10, 784)
    assert dm.baseline_loss == pytest.approx(math.log(10)) and dm.target == "last"
    dm.setup("fit")
    train, val = dm.datasets["train"].indices, dm.datasets["val"].indices
    assert len(train) == 30 and len(val) == 10
    assert sorted(train.tolist() + val.tolist()) == list(range(40))
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 784, 1) and y.shape == (8,)
    again = PixelMNISTDataModule(str(tmp_path / "mnist"), permuted=True, val_size=10)
    again.setup("fit")
    assert torch.equal(again.datasets["val"].indices, val)  # the split is seeded
    rows = PixelMNISTDataModule(str(tmp_path / "mnist"), rows=True, val_size=10, batch_size=8)
    assert rows.input_size == 28 and rows.seq_len == 28
    rows.setup("test")
    assert next(iter(rows.test_dataloader()))[0].shape == (8, 28, 28)
