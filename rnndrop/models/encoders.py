"""The encoders models are built on: an rnndrop LSTM stack or the causal transformer.

Both take batch-first input and a state, and return ``(output, pre_dropout, state)``;
the transformer carries no state (``None``).
"""

from __future__ import annotations

from typing import Any, Literal

from torch import Tensor, nn

from ..config import RecurrentDropout, TransformerDropout
from ..nn import LSTM, CausalTransformer

__all__ = ["EncoderKind", "LSTMStack", "TransformerEncoder", "build_encoder", "plain_config"]

EncoderKind = Literal["lstm", "transformer"]


def plain_config(args: dict[str, Any]) -> dict[str, Any]:
    """Constructor arguments as plain data (dropout configs become dicts)."""
    return {k: v.to_dict() if hasattr(v, "to_dict") else v for k, v in args.items()}


class LSTMStack(nn.Module):
    """``num_layers`` rnndrop LSTM layers whose last one may be narrower (AWD-LSTM tying).

    With ``last_size == hidden_size`` this is one :class:`rnndrop.nn.LSTM`. Otherwise it is
    an LSTM of ``num_layers - 1`` layers followed by a one-layer LSTM of width
    ``last_size``, with the scheme split so that every mask acts exactly once where the
    single LSTM would put it: the first part's output mask is the between-layers mask.

    State: ``(h, c)`` for one part, a list of them for two.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int,
        dropout: RecurrentDropout,
        last_size: int | None = None,
    ) -> None:
        super().__init__()
        last = last_size or hidden_size
        if last == hidden_size or num_layers == 1:
            self.parts = nn.ModuleList(
                [
                    LSTM(
                        input_size,
                        last if num_layers == 1 else hidden_size,
                        num_layers,
                        batch_first=True,
                        dropout=dropout,
                    )
                ]
            )
        else:
            inner = dropout.between_layers if num_layers > 2 else 0.0  # 1 layer: no use
            first = dropout.replace(output=dropout.between_layers, between_layers=inner)
            second = dropout.replace(input=0.0, between_layers=0.0)
            self.parts = nn.ModuleList(
                [
                    LSTM(input_size, hidden_size, num_layers - 1, batch_first=True, dropout=first),
                    LSTM(hidden_size, last, 1, batch_first=True, dropout=second),
                ]
            )
        self.output_size = last

    def forward(self, x: Tensor, state: Any = None) -> tuple[Tensor, Tensor, Any]:
        states = (
            [None] * len(self.parts)
            if state is None
            else ([state] if len(self.parts) == 1 else list(state))
        )
        new = []
        for lstm, s in zip(self.parts, states, strict=True):
            x, hc, pre = lstm(x, s, return_pre_dropout=True)
            new.append(hc)
        return x, pre, new[0] if len(new) == 1 else new


class TransformerEncoder(nn.Module):
    """:class:`rnndrop.nn.CausalTransformer` behind the encoder contract (batch-first)."""

    def __init__(
        self,
        input_size: int,
        d_model: int,
        num_layers: int,
        num_heads: int,
        ffn_size: int | None,
        dropout: TransformerDropout,
        positions: str,
        max_len: int,
    ) -> None:
        super().__init__()
        self.transformer = CausalTransformer(
            input_size,
            d_model,
            num_layers,
            num_heads,
            ffn_size,
            dropout,
            positions,  # type: ignore[arg-type]
            max_len,
            batch_first=True,
        )
        self.output_size = d_model

    def forward(self, x: Tensor, state: Any = None) -> tuple[Tensor, Tensor, None]:
        out, _ = self.transformer(x)
        return out, out, None


def build_encoder(
    kind: EncoderKind,
    input_size: int,
    hidden_size: int,
    num_layers: int,
    dropout: RecurrentDropout,
    transformer_dropout: TransformerDropout,
    *,
    last_size: int | None = None,
    num_heads: int = 4,
    ffn_size: int | None = None,
    positions: str = "sinusoidal",
    max_len: int = 1024,
) -> LSTMStack | TransformerEncoder:
    """An encoder by name; ``hidden_size`` is the transformer's ``d_model``."""
    if kind == "lstm":
        return LSTMStack(input_size, hidden_size, num_layers, dropout, last_size)
    if kind == "transformer":
        return TransformerEncoder(
            input_size,
            hidden_size,
            num_layers,
            num_heads,
            ffn_size,
            transformer_dropout,
            positions,
            max_len,
        )
    raise ValueError(f"encoder must be 'lstm' or 'transformer', got {kind!r}")
