"""A sequence model for the synthetic tasks and pixel MNIST: encoder -> per-step or last head."""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

from torch import Tensor, nn

from ..config import DropoutSpec, TransformerDropout
from .encoders import EncoderKind, build_encoder, encoder_dropout

__all__ = ["SeqOutput", "SequenceModel"]


class SeqOutput(NamedTuple):
    prediction: Tensor  # (B, T, O) per step, or (B, O) for the last step
    state: Any
    output: Tensor  # (B, T, H) encoder output (after output dropout)
    raw_output: Tensor  # (B, T, H) before output dropout


class SequenceModel(nn.Module):
    r"""Reads a sequence and predicts at every step or after the last one.

    Tokens are embedded (``input_kind="tokens"``); float features go to the encoder as they
    are. The head is linear: class logits (``output_size`` classes) or regression outputs.

    Args:
        input_kind: ``"tokens"`` or ``"float"`` (linked from the data module).
        vocab_size: token vocabulary (tokens).
        input_size: features per step (float).
        output_size: classes or regression outputs.
        target: ``"per_step"`` (a prediction per step) or ``"last"`` (one per sequence).
        embedding_size: token embedding width.
        hidden_size, num_layers, encoder, dropout, transformer_dropout, num_heads, ffn_size,
            positions, max_len: the encoder (``"lstm"``, ``"gru"``, ``"rnn"`` or
            ``"transformer"``) and its dropout, as in :class:`~rnndrop.models.LanguageModel`.
            There is no embedding dropout here: ``dropout.embedding`` has no effect on a
            sequence model.

    Shape:
        ``(B, T)`` tokens or ``(B, T, F)`` floats -> ``(B, T, O)`` or ``(B, O)``.
    """

    def __init__(
        self,
        input_kind: Literal["tokens", "float"] = "tokens",
        vocab_size: int | None = None,
        input_size: int | None = None,
        output_size: int = 2,
        target: Literal["per_step", "last"] = "per_step",
        embedding_size: int = 32,
        hidden_size: int = 128,
        num_layers: int = 1,
        encoder: EncoderKind = "lstm",
        dropout: DropoutSpec | TransformerDropout = None,
        transformer_dropout: TransformerDropout | None = None,
        num_heads: int = 4,
        ffn_size: int | None = None,
        positions: str = "sinusoidal",
        max_len: int = 2048,
    ) -> None:
        super().__init__()
        args = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        if target not in ("per_step", "last"):
            raise ValueError(f"target must be 'per_step' or 'last', got {target!r}")
        if input_kind == "tokens":
            if not vocab_size:
                raise ValueError("input_kind='tokens' needs vocab_size (the data module's)")
            self.embed: nn.Module = nn.Embedding(vocab_size, embedding_size)
            features = embedding_size
        elif input_kind == "float":
            if not input_size:
                raise ValueError("input_kind='float' needs input_size (the data module's)")
            self.embed, features = nn.Identity(), input_size
        else:
            raise ValueError(f"input_kind must be 'tokens' or 'float', got {input_kind!r}")
        self.dropout, transformer_dropout = encoder_dropout(encoder, dropout, transformer_dropout)
        dropout = self.dropout
        # the constructor's arguments as plain data: hparams, and rebuilding from a checkpoint
        self.config = {**args, "dropout": dropout.to_dict(),
                       "transformer_dropout": transformer_dropout.to_dict()}  # fmt: skip
        self.encoder = build_encoder(
            encoder,
            features,
            hidden_size,
            num_layers,
            dropout,
            transformer_dropout,
            num_heads=num_heads,
            ffn_size=ffn_size,
            positions=positions,
            max_len=max_len,
        )
        self.head = nn.Linear(self.encoder.output_size, output_size)
        self.target, self.input_kind = target, input_kind

    def features(self, x: Tensor) -> Tensor:
        """What the encoder reads: embedded tokens or the float features, ``(B, T, F)``."""
        return self.embed(x)

    def readout(self, out: Tensor) -> Tensor:
        """Encoder output ``(..., H)`` -> predictions ``(..., O)``."""
        return self.head(out)

    def forward(self, x: Tensor, state: Any = None) -> SeqOutput:
        out, raw, state = self.encoder(self.features(x), state)  # (B, T, H)
        h = out if self.target == "per_step" else out[:, -1]
        return SeqOutput(self.readout(h), state, out, raw)
