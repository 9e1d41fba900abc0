"""A causal pre-norm transformer with dropout named by site: the baseline for the LSTMs."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..config import TransformerDropout
from ..functional import bernoulli_mask, drop_path_mask
from .dropout import StochasticModule

__all__ = ["CausalTransformer", "TransformerBlock", "sinusoidal_positions"]


def sinusoidal_positions(length: int, dim: int, device=None, dtype=None) -> Tensor:
    """Vaswani et al. 2017: ``PE[t, 2i] = sin(t / 10000^(2i/d))``, ``PE[t, 2i+1] = cos(...)``."""
    pos = torch.arange(length, device=device, dtype=torch.float64)[:, None]
    freq = torch.exp(
        torch.arange(0, dim, 2, device=device, dtype=torch.float64) * (-math.log(1e4) / dim)
    )
    pe = torch.zeros(length, dim, device=device, dtype=torch.float64)
    pe[:, 0::2] = torch.sin(pos * freq)
    pe[:, 1::2] = torch.cos(pos * freq[: dim // 2])
    return pe.to(dtype or torch.get_default_dtype())


def _as_config(dropout: TransformerDropout | Mapping[str, Any] | None) -> TransformerDropout:
    if dropout is None:
        return TransformerDropout()
    return TransformerDropout.from_dict(dropout)


class TransformerBlock(StochasticModule):
    """One causal pre-norm block; see :class:`~rnndrop.config.TransformerDropout` for the sites.

    Args:
        d_model, num_heads, ffn_size: widths.
        dropout: the block's rates.
        drop_path: this block's DropPath rate.

    Shape:
        ``(B, T, d_model)`` -> same.
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        ffn_size: int,
        dropout: TransformerDropout,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by num_heads ({num_heads})")
        self.num_heads, self.cfg, self.drop_path = num_heads, dropout, drop_path
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc1 = nn.Linear(d_model, ffn_size)
        self.fc2 = nn.Linear(ffn_size, d_model)

    def _drop(self, x: Tensor, p: float, site: str) -> Tensor:
        return _dropout(self, x, p, site)

    def _branch(self, x: Tensor, name: str) -> Tensor:
        x = self._drop(x, self.cfg.residual, f"residual_{name}")
        if not (self.sampling and self.drop_path > 0):
            return x
        m = drop_path_mask(x, self.drop_path)  # as drop_path
        self._keep_mask(f"drop_path_{name}", m)
        return x * m

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=-1)
        q, k, v = (t.view(B, T, self.num_heads, -1).transpose(1, 2) for t in (q, k, v))
        p_att = self.cfg.attention if self.sampling else 0.0  # dropout_p only when sampling
        a = F.scaled_dot_product_attention(q, k, v, dropout_p=p_att, is_causal=True)
        x = x + self._branch(self.proj(a.transpose(1, 2).reshape(B, T, C)), "attn")  # (B, T, C)
        h = self._drop(F.gelu(self.fc1(self.ln2(x))), self.cfg.ffn, "ffn")
        return x + self._branch(self.fc2(h), "ffn")

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, drop_path={self.drop_path:g}"


class CausalTransformer(StochasticModule):
    r"""A causal pre-norm transformer encoder with the LSTM's calling convention.

    ``x_0 = Drop_emb(x W_in + P)``, then ``num_layers`` blocks
    (:class:`TransformerBlock`), then a final LayerNorm. Each position attends to itself and
    the past only. Dropout sites and the DropPath depth schedule come from
    :class:`~rnndrop.config.TransformerDropout`; masks are sampled in training and in MC
    mode (:func:`rnndrop.nn.mc_dropout`).

    ``forward(x, state)`` returns ``(output, state)`` like :class:`rnndrop.nn.LSTM`, so models
    can swap the two; no state is carried (``state`` is ignored and ``None`` returned), so
    each call sees only its own ``T`` steps.

    Args:
        input_size: features of ``x`` (projected to ``d_model`` if different).
        d_model: model width.
        num_layers: blocks.
        num_heads: attention heads (must divide ``d_model``).
        ffn_size: FFN width (default ``4 · d_model``).
        dropout: a :class:`~rnndrop.config.TransformerDropout` or a dict of its fields.
        positions: ``"sinusoidal"`` or ``"learned"`` (up to ``max_len`` steps).
        max_len: longest sequence for learned positions.
        batch_first: ``(B, T, F)`` instead of ``(T, B, F)``.

    Shape:
        ``(T, B, input_size)`` (or batch-first) -> ``(T, B, d_model)``.
    """

    def __init__(
        self,
        input_size: int,
        d_model: int = 256,
        num_layers: int = 4,
        num_heads: int = 4,
        ffn_size: int | None = None,
        dropout: TransformerDropout | Mapping[str, Any] | None = None,
        positions: Literal["sinusoidal", "learned"] = "sinusoidal",
        max_len: int = 1024,
        batch_first: bool = False,
    ) -> None:
        super().__init__()
        if positions not in ("sinusoidal", "learned"):
            raise ValueError(f"positions must be 'sinusoidal' or 'learned', got {positions!r}")
        for name, value in (
            ("input_size", input_size),
            ("d_model", d_model),
            ("num_layers", num_layers),
            ("num_heads", num_heads),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.dropout = _as_config(dropout)
        self.input_size, self.d_model, self.batch_first = input_size, d_model, batch_first
        self.positions, self.max_len = positions, max_len
        self.mc = False
        self.input_proj = nn.Linear(input_size, d_model) if input_size != d_model else nn.Identity()
        self.pos = nn.Embedding(max_len, d_model) if positions == "learned" else None
        ffn = ffn_size or 4 * d_model
        self.blocks = nn.ModuleList(
            TransformerBlock(
                d_model, num_heads, ffn, self.dropout, self.dropout.drop_path_rate(i, num_layers)
            )
            for i in range(num_layers)
        )
        self.ln_f = nn.LayerNorm(d_model)
        self.apply(_init_weights)

    def forward(self, x: Tensor, state: Any = None, *, return_pre_dropout: bool = False):
        if x.dim() != 3:
            raise ValueError(f"CausalTransformer: expected a 3-D input, got {x.dim()}-D")
        if x.shape[-1] != self.input_size:
            raise RuntimeError(
                f"input.size(-1) must be equal to input_size. "
                f"Expected {self.input_size}, got {x.shape[-1]}"
            )
        if not self.batch_first:
            x = x.transpose(0, 1)  # (B, T, F)
        T = x.shape[1]
        h = self.input_proj(x)
        if self.pos is not None:
            if self.max_len < T:
                raise ValueError(
                    f"sequence of {T} steps is longer than max_len={self.max_len} of the "
                    "learned positions; raise max_len or use positions='sinusoidal'"
                )
            h = h + self.pos.weight[:T]
        else:
            h = h + sinusoidal_positions(T, self.d_model, h.device, h.dtype)
        h = _dropout(self, h, self.dropout.embedding, "embedding")
        for block in self.blocks:
            h = block(h)
        out = self.ln_f(h)  # (B, T, d_model)
        if not self.batch_first:
            out = out.transpose(0, 1)
        return (out, None, out) if return_pre_dropout else (out, None)

    def extra_repr(self) -> str:
        return f"dropout={self.dropout.describe()}, positions={self.positions}"


def _dropout(module: StochasticModule, x: Tensor, p: float, site: str) -> Tensor:
    """``F.dropout`` while sampling; with ``record_masks`` an explicit mask, kept by site.

    The recorded mask comes from :func:`~rnndrop.functional.bernoulli_mask`, not from
    ``F.dropout``'s generator, so a recording step draws other masks than it would have.
    """
    if not module.sampling or p == 0:
        return x
    if not module.record_masks:
        return F.dropout(x, p, training=True)
    mask = bernoulli_mask(x.shape, p, device=x.device, dtype=x.dtype)
    module._keep_mask(site, mask)
    return x * mask


def _init_weights(m: nn.Module) -> None:
    # GPT-2's initialisation: N(0, 0.02) weights, zero biases
    if isinstance(m, nn.Linear):
        nn.init.normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Embedding):
        nn.init.normal_(m.weight, std=0.02)
