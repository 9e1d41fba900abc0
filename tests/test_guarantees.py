"""Core guarantees: embedding-dropout rate, unbiased masks at every inverted site,
the fallback without the compiled kernel, dropout with ``proj_size`` against ``nn.LSTM``,
and the vocabulary in data-module state and Lightning checkpoints.

Statistical tests use fixed seeds and tolerances of Z standard errors of the quantity
estimated, with that test's sample size.
"""

import math
import os
import subprocess
import sys

import lightning as L
import pytest
import torch
from torch import nn
from torch.func import functional_call

from rnndrop import functional as F
from rnndrop.config import RecurrentDropout as RD
from rnndrop.kernels.cpp import build as _ext
from rnndrop.nn import LSTM

Z = 5.0


# ---- 1. embedding dropout ----------------------------------------------------------------


def test_embedding_dropout_drops_word_types_at_the_rate_and_scales_kept_rows():
    V, E, p = 20_000, 3, 0.3
    weight = torch.randn(V, E, dtype=torch.float64).abs() + 0.5  # no zero entries
    indices = torch.arange(V)  # every word type once, (T,) layout
    out = F.embedding_dropout(indices, weight, p, training=True)
    assert out.shape == (V, E)
    ratio = out / weight
    dropped = (out == 0).all(-1)
    # a word type is dropped as a whole: all of its row, or none of it
    assert torch.equal((out == 0).any(-1), dropped)
    n = V
    rate = dropped.double().mean().item()
    tol = Z * math.sqrt(p * (1 - p) / n)
    assert abs(rate - p) < tol, f"drop rate {rate:.4f}, expected {p} ± {tol:.4f}"
    # kept rows: scaled by 1 / keep (inverted dropout, realised keep probability)
    keep = F.keep_probability(p)
    torch.testing.assert_close(
        ratio[~dropped], torch.full_like(ratio[~dropped], 1 / keep), rtol=1e-12, atol=0
    )
    assert abs(1 / keep - 1 / (1 - p)) < 1e-4


def test_embedding_dropout_shares_the_mask_over_occurrences_and_is_identity_in_eval():
    V, E, p = 500, 4, 0.3
    weight = torch.randn(V, E, dtype=torch.float64)
    indices = torch.randint(0, V, (40, 8))
    out = F.embedding_dropout(indices, weight, p, training=True)
    assert out.shape == (40, 8, E)
    dropped = (out == 0).all(-1)
    # one mask over the vocabulary (per_sample=False): every occurrence of a type agrees
    for word in indices.unique().tolist():
        where = dropped[indices == word]
        assert bool(where.all()) or not bool(where.any()), word
    assert torch.equal(F.embedding_dropout(indices, weight, p, training=False), weight[indices])


# ---- 2. expectation at every inverted LSTM site ------------------------------------------

INVERTED_SITES = ("input", "between_layers", "recurrent", "output", "candidate", "weight_hh")


@pytest.mark.parametrize("time", ["per_step", "per_sequence"])
@pytest.mark.parametrize("batch", ["per_sample", "per_batch"])
@pytest.mark.parametrize("tied", [True, False])
def test_every_inverted_mask_has_mean_one(time, batch, tied):
    p, z = 0.3, 0.2
    cfg = RD(
        **dict.fromkeys(INVERTED_SITES, p),
        zoneout_hidden=z,
        zoneout_cell=z,
        time=time,
        batch=batch,
        tied=tied,
    )
    lstm = LSTM(48, 64, 2, dropout=cfg)
    lstm.record_masks = True
    lstm(torch.randn(6, 32, 48))
    masks = lstm.last_masks
    expected = {"input/l0", "between_layers/l1", "output"}
    expected |= {f"{s}/l{k}" for s in ("recurrent", "candidate", "weight_hh") for k in (0, 1)}
    expected |= {f"zoneout_{s}/l{k}" for s in ("hidden", "cell") for k in (0, 1)}
    assert set(masks) == expected
    q = F.keep_probability(p)
    for name, m in masks.items():
        n = m.numel()
        if name.startswith("zoneout"):  # not scaled: 1 (keep previous) with probability z
            assert set(m.unique().tolist()) <= {0.0, 1.0}, name
            frac = m.double().mean().item()
            assert abs(frac - z) < Z * math.sqrt(z * (1 - z) / n), (name, frac)
            continue
        scaled = torch.isclose(m, torch.tensor(1 / q, dtype=m.dtype), rtol=1e-6, atol=0)
        assert ((m == 0) | scaled).all(), name  # 0 or 1/q, nothing else
        mean = m.double().mean().item()
        se = math.sqrt((1 - q) / q / n)
        assert abs(mean - 1) < Z * se, f"{name}: mean {mean:.4f}, n={n}, tol {Z * se:.4f}"


# ---- 3. fallback without the compiled kernel ---------------------------------------------

_SCRIPT = """
import torch
from rnndrop.kernels.cpp import build as _ext
from rnndrop.config import RecurrentDropout
from rnndrop.nn import LSTM

torch.manual_seed(0)
lstm = LSTM(4, 6, 1, dropout=RecurrentDropout.variational(0.3)).double()
x = torch.randn(7, 5, 4, dtype=torch.float64, requires_grad=True)
out, (h, c) = lstm(x)
(out.square().sum() + h.sum() + c.sin().sum()).backward()
assert _ext.load() is None
values = [out.sum(), out.square().sum(), h.sum(), c.sum(), x.grad.sum(), x.grad.square().sum()]
values += [p.grad.sum() for p in lstm.parameters()]
print(" ".join(repr(float(v)) for v in values))
"""


def _checksum_in_process():
    torch.manual_seed(0)
    lstm = LSTM(4, 6, 1, dropout=RD.variational(0.3)).double()
    x = torch.randn(7, 5, 4, dtype=torch.float64, requires_grad=True)
    out, (h, c) = lstm(x)
    (out.square().sum() + h.sum() + c.sin().sum()).backward()
    values = [out.sum(), out.square().sum(), h.sum(), c.sum(), x.grad.sum(), x.grad.square().sum()]
    values += [p.grad.sum() for p in lstm.parameters()]
    return [float(v.detach()) for v in values]


def test_subprocess_without_extension_matches_the_pure_pytorch_loop(monkeypatch):
    env = dict(os.environ, RNNDROP_EXTENSION="0")
    env.pop("RNNDROP_LOOP", None)
    res = subprocess.run(
        [sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr
    theirs = [float(v) for v in res.stdout.split()]
    monkeypatch.setenv("RNNDROP_LOOP", "python")
    ours = _checksum_in_process()
    assert len(theirs) == len(ours) == 6 + 4
    assert any(v != 0 for v in ours)
    for a, b in zip(theirs, ours, strict=True):
        assert a == pytest.approx(b, rel=1e-10, abs=1e-12)


def _variational_run(seed=3):
    torch.manual_seed(seed)
    lstm = LSTM(4, 6, 2, dropout=RD.variational(0.3))
    lstm.record_masks = True
    x = torch.randn(7, 5, 4, requires_grad=True)
    out, (h, c) = lstm(x)
    (out.square().sum() + h.sum() + c.sum()).backward()
    return [out, h, c, x.grad, *[p.grad for p in lstm.parameters()]], dict(lstm.last_masks)


def test_no_compiler_falls_back_with_a_warning_and_the_same_result(monkeypatch):
    monkeypatch.delenv("RNNDROP_EXTENSION", raising=False)
    monkeypatch.delenv("RNNDROP_LOOP", raising=False)
    if _ext.load() is None:
        pytest.skip("the compiled kernel is not available here: nothing to compare with")
    compiled, compiled_masks = _variational_run()

    monkeypatch.setattr(_ext.shutil, "which", lambda *a, **k: None)
    monkeypatch.setattr(_ext, "_state", {})
    with pytest.warns(RuntimeWarning, match="compiler"):
        assert _ext.load() is None
    assert _ext.loaded() is None
    fallback, fallback_masks = _variational_run()
    assert fallback_masks.keys() == compiled_masks.keys()
    for k in compiled_masks:  # counter-based masks: the same bits without the kernel
        assert torch.equal(fallback_masks[k], compiled_masks[k]), k
    for a, b in zip(fallback, compiled, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# ---- 4. dropout with proj_size, against nn.LSTM ------------------------------------------


def _proj_pair(cfg):
    ours = LSTM(4, 6, 2, proj_size=3, dropout=cfg, dtype=torch.float64)
    ref = nn.LSTM(4, 6, 2, proj_size=3, dtype=torch.float64)
    ref.load_state_dict(ours.state_dict())
    ours.record_masks = True
    return ours, ref


def _proj_inputs(T=7, B=5):
    x = torch.randn(T, B, 4, dtype=torch.float64)
    h0 = torch.randn(2, B, 3, dtype=torch.float64)
    c0 = torch.randn(2, B, 6, dtype=torch.float64)
    return x, (h0, c0)


def _single_layers(ref):
    """Two one-layer nn.LSTMs holding layer 0 and layer 1 of ``ref``."""
    layers = []
    for k, in_size in ((0, 4), (1, 3)):
        one = nn.LSTM(in_size, 6, 1, proj_size=3, dtype=torch.float64)
        one.load_state_dict(
            {
                name.replace(f"_l{k}", "_l0"): t
                for name, t in ref.state_dict().items()
                if name.endswith(f"_l{k}")
            }
        )
        layers.append(one)
    return layers


def test_naive_dropout_with_proj_size_matches_nn_lstm_with_the_recorded_masks():
    ours, ref = _proj_pair(RD.naive(0.4))
    x, (h0, c0) = _proj_inputs()
    out, (h, c) = ours(x, (h0, c0))
    m = ours.last_masks
    assert set(m) == {"input/l0", "between_layers/l1", "output"}
    assert m["input/l0"].shape == (7, 5, 4)  # per step, per sample
    assert m["between_layers/l1"].shape == (7, 5, 3)  # the projected size
    assert m["output"].shape == (7, 5, 3)
    assert all((v == 0).any() for v in m.values())  # the masks do drop something

    l0, l1 = _single_layers(ref)
    with torch.no_grad():
        y0, (h_a, c_a) = l0(x * m["input/l0"], (h0[:1], c0[:1]))
        y1, (h_b, c_b) = l1(y0 * m["between_layers/l1"], (h0[1:], c0[1:]))
    want = y1 * m["output"]
    torch.testing.assert_close(out, want, atol=1e-6, rtol=0)
    torch.testing.assert_close(h, torch.cat([h_a, h_b]), atol=1e-6, rtol=0)
    torch.testing.assert_close(c, torch.cat([c_a, c_b]), atol=1e-6, rtol=0)


def test_weight_drop_with_proj_size_matches_nn_lstm_with_the_dropped_weights():
    ours, ref = _proj_pair(RD.weight_drop(0.5))
    x, hx = _proj_inputs()
    out, (h, c) = ours(x, hx)
    out.sum().backward()
    m = ours.last_masks
    assert set(m) == {"weight_hh/l0", "weight_hh/l1"}
    params = dict(ref.named_parameters())
    for k in (0, 1):
        assert m[f"weight_hh/l{k}"].shape == (24, 3)  # (4H, proj_size)
        assert (m[f"weight_hh/l{k}"] == 0).any()
        params[f"weight_hh_l{k}"] = params[f"weight_hh_l{k}"] * m[f"weight_hh/l{k}"]
    want, (h_r, c_r) = functional_call(ref, params, (x, hx))
    torch.testing.assert_close(out, want, atol=1e-6, rtol=0)
    torch.testing.assert_close(h, h_r, atol=1e-6, rtol=0)
    torch.testing.assert_close(c, c_r, atol=1e-6, rtol=0)
    want.sum().backward()  # the gradient reaches the real weight through the same mask
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, getattr(ref, name).grad, atol=1e-6, rtol=0)


# ---- 5. vocabulary in data-module state and Lightning checkpoints ------------------------


def _lm_module(corpus):
    from rnndrop.data import LanguageModelDataModule

    return LanguageModelDataModule("folder", data_dir=str(corpus), batch_size=4, bptt=6)


def test_datamodule_state_holds_the_vocab_and_restores_the_ids(text_corpus, tmp_path):
    dm = _lm_module(text_corpus)
    assert dm.state_dict() == {}  # nothing loaded yet, nothing to save
    dm.setup("fit")
    state = dm.state_dict()
    assert "vocab" in state
    text = list("hgfedcbaab")
    fresh = _lm_module(text_corpus)
    fresh.load_state_dict(state)
    fresh.setup("fit")
    assert fresh.vocab.itos == dm.vocab.itos
    assert torch.equal(fresh.vocab.encode(text), dm.vocab.encode(text))
    assert torch.equal(fresh.corpus.train, dm.corpus.train)

    # the saved vocab is checked: a corpus whose first-appearance order differs is refused
    other = tmp_path / "other"
    other.mkdir()
    for f in text_corpus.iterdir():
        words = f.read_text().split()
        order = sorted(set(words), reverse=True)  # a different order of first appearance
        (other / f.name).write_text(" ".join(order) + "\n" + f.read_text())
    shifted = _lm_module(other)
    shifted.load_state_dict(state)
    with pytest.raises(ValueError, match="vocabulary"):
        shifted.setup("fit")


def test_lightning_checkpoint_contains_the_datamodule_vocab(text_corpus, tmp_path):
    from rnndrop.data import LanguageModelDataModule
    from rnndrop.lit import LanguageModelTask
    from rnndrop.models import LanguageModel

    L.seed_everything(0)
    dm = LanguageModelDataModule("folder", data_dir=str(text_corpus), batch_size=4,
                                 eval_batch_size=4, bptt=6)  # fmt: skip
    net = LanguageModel(dm.vocab_size, 8, 12, 2, dropout=RD.variational(0.3))
    task = LanguageModelTask(net, lr=0.5)
    trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False,
                        limit_val_batches=0, enable_progress_bar=False,
                        enable_model_summary=False)  # fmt: skip
    trainer.fit(task, dm)
    path = tmp_path / "lm.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    key = next((k for k in ckpt if "LanguageModelDataModule" in k), None)
    assert key is not None, sorted(ckpt)
    assert "vocab" in ckpt[key]
    from rnndrop.data.vocab import Vocab

    saved = Vocab.from_state_dict(ckpt[key]["vocab"])
    assert saved.itos == dm.vocab.itos and len(saved) == dm.vocab_size
    assert set(saved.itos) >= set("abcdefgh")
