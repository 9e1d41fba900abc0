"""rnndrop.functional and the thin modules in rnndrop.nn.dropout."""

import math
import subprocess
import sys

import pytest
import torch

from rnndrop import functional as F
from rnndrop.nn import DropPath, EmbeddingDropout, LockedDropout, Zoneout

Z = 5.0


def test_identity_when_not_training_or_p_zero():
    x = torch.randn(5, 3, 4)
    idx = torch.randint(0, 7, (5, 3))
    w = torch.randn(7, 4)
    assert F.locked_dropout(x, 0.5, training=False) is x
    assert F.locked_dropout(x, 0.0) is x
    assert F.drop_path(x, 0.5, training=False) is x
    assert torch.equal(F.embedding_dropout(idx, w, 0.5, training=False), w[idx])
    assert F.zoneout(x, -x, 0.0) is -x or torch.equal(F.zoneout(x, -x, 0.0), -x)


@pytest.mark.parametrize("batch_first", [False, True])
def test_locked_dropout_shares_mask_over_time(batch_first):
    x = torch.ones(20, 16, 64)
    if batch_first:
        x = x.transpose(0, 1)
    y = F.locked_dropout(x, 0.4, batch_first=batch_first)
    t = 1 if batch_first else 0
    assert (y == y.narrow(t, 0, 1)).all()  # same at every step
    b = 0 if batch_first else 1
    assert not (y == y.narrow(b, 0, 1)).all()  # differs across the batch
    p = (y.narrow(t, 0, 1) == 0).double().mean().item()
    assert abs(p - 0.4) < Z * math.sqrt(0.24 / (16 * 64))


def test_locked_dropout_per_step_and_per_batch():
    x = torch.ones(20, 16, 64)
    y = F.locked_dropout(x, 0.4, per_step=True, per_sample=False)
    assert (y == y[:, :1]).all() and not (y == y[:1]).all()


@pytest.mark.parametrize("per_sample", [False, True])
def test_embedding_dropout_drops_word_types(per_sample):
    V, E = 50, 8
    w = torch.randn(V, E)
    idx = torch.randint(0, V, (40, 6))
    out = F.embedding_dropout(idx, w, 0.5, per_sample=per_sample)
    dropped = (out == 0).all(-1)  # (T, B): a whole vector is zero
    kept_ok = torch.allclose(out[~dropped], w[idx][~dropped] / F.keep_probability(0.5))
    assert kept_ok
    for b in range(idx.shape[1]):  # within a sequence a word is dropped everywhere or nowhere
        for word in idx[:, b].unique():
            d = dropped[:, b][idx[:, b] == word]
            assert d.all() or not d.any()
    if not per_sample:  # one vocabulary mask for the whole batch
        for word in idx.unique():
            d = dropped[idx == word]
            assert d.all() or not d.any()


def test_embedding_dropout_module_is_an_embedding():
    emb = EmbeddingDropout(10, 4, p=0.3)
    ref = torch.nn.Embedding(10, 4)
    ref.load_state_dict(emb.state_dict())
    idx = torch.randint(0, 10, (5, 2))
    emb.eval()
    assert torch.equal(emb(idx), ref(idx))
    assert "p=0.3" in repr(emb)


def test_drop_path_per_sample():
    x = torch.ones(4000, 3, 5)
    y = F.drop_path(x, 0.25)
    per_sample = y.flatten(1)
    assert ((per_sample == 0).all(1) | (per_sample == per_sample[:, :1]).all(1)).all()
    rate = (per_sample[:, 0] == 0).double().mean().item()
    assert abs(rate - 0.25) < Z * math.sqrt(0.25 * 0.75 / 4000)
    assert isinstance(DropPath(0.1), torch.nn.Module)


def test_zoneout_function_train_and_eval():
    prev, new = torch.zeros(100_000), torch.ones(100_000)
    y = F.zoneout(prev, new, 0.3, training=True)
    assert set(y.unique().tolist()) == {0.0, 1.0}
    assert abs((y == 0).double().mean().item() - 0.3) < Z * math.sqrt(0.21 / 1e5)
    torch.testing.assert_close(F.zoneout(prev, new, 0.3, training=False), torch.full_like(new, 0.7))
    mod = Zoneout(0.3).eval()
    torch.testing.assert_close(mod(prev, new), torch.full_like(new, 0.7))


def test_locked_dropout_module_classic_scaling():
    m = LockedDropout(0.4, scaling="classic")
    x = torch.ones(3, 2, 5)
    assert set(m(x).unique().tolist()) <= {0.0, 1.0}
    m.eval()
    torch.testing.assert_close(m(x), x * 0.6)


def test_ar_tar_by_hand():
    h = torch.tensor([[[1.0, 2.0]], [[3.0, 5.0]]])  # (T=2, B=1, 2)
    assert F.activation_regularization(h, 2.0).item() == pytest.approx(2.0 * (1 + 4 + 9 + 25) / 4)
    assert F.temporal_activation_regularization(h, 1.0).item() == pytest.approx((4 + 9) / 2)
    hb = h.transpose(0, 1)
    assert F.temporal_activation_regularization(hb, 1.0, batch_first=True).item() == pytest.approx(
        6.5
    )
    assert F.activation_regularization(h, 0).item() == 0


def test_sequence_mask():
    m = F.sequence_mask(torch.tensor([3, 1]), 4)
    assert m.tolist() == [[True, True], [True, False], [True, False], [False, False]]


def test_core_imports_without_lightning():
    code = (
        "import sys, rnndrop, rnndrop.nn, rnndrop.functional, rnndrop.config\n"
        "heavy = [m for m in sys.modules if m.split('.')[0] in "
        "('lightning', 'pytorch_lightning', 'tensorboard', 'matplotlib', 'torchmetrics')]\n"
        "assert not heavy, heavy\n"
        "from rnndrop.nn import LSTM\n"
        "LSTM(3, 4)(__import__('torch').randn(2, 1, 3))\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_seeded_mask_mul_matches_the_mask(compiled, dtype, monkeypatch):
    """x * mask(seed) without storing the mask, in place too, equals the stored mask's product."""
    from rnndrop.functional import seeded_mask, seeded_mask_mul
    from rnndrop.kernels.cpp import build as _ext

    if compiled and _ext.load() is None:
        pytest.skip("compiled kernel unavailable")
    if not compiled:
        monkeypatch.setattr(_ext, "loaded", lambda: None)
    x = torch.randn(37, 5, dtype=dtype)  # odd size: the kernel's tail loop runs
    for p, scale in ((0.3, True), (0.5, False), (1e-7, True)):
        mask = seeded_mask(x.shape, p, 99, scale=scale, dtype=dtype)
        out = seeded_mask_mul(x, p, 99, scale=scale, out=torch.empty_like(x))
        assert torch.equal(out, x * mask)
        y = x.clone()
        seeded_mask_mul(y, p, 99, scale=scale, out=y)
        assert torch.equal(y, x * mask)
    kept = seeded_mask((100_000,), 0.3, 5) != 0
    n = kept.numel()
    assert abs(kept.float().mean().item() - 0.7) < 4 * (0.7 * 0.3 / n) ** 0.5


@pytest.mark.slow
def test_masks_are_the_same_under_torch_compile(monkeypatch):
    """The pure-torch mask bits stay out of compiled graphs: inductor's int64 code gave other
    (and biased) bits, so a compiled model would have drawn different masks."""
    from rnndrop.functional import seeded_mask
    from rnndrop.kernels.cpp import build as _ext

    monkeypatch.setattr(_ext, "loaded", lambda: None)  # the torch-ops path, as on CUDA

    def f(x, seed):
        return x * seeded_mask(x.shape, 0.5, seed)

    compiled = torch.compile(f, dynamic=False)
    x = torch.ones(4000)
    for seed in (123456789123, -5, 2**62 + 7):
        assert torch.equal(compiled(x, seed), f(x, seed))
