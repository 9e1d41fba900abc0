"""A word- or character-level language model: embedding -> encoder -> decoder."""

from __future__ import annotations

from typing import Any, NamedTuple

from torch import Tensor, nn

from ..config import DropoutSpec, TransformerDropout
from ..nn import EmbeddingDropout
from .encoders import EncoderKind, build_encoder, encoder_dropout

__all__ = ["LMOutput", "LanguageModel"]


class LMOutput(NamedTuple):
    logits: Tensor  # (B, T, V)
    state: Any  # to carry into the next chunk (None for the transformer)
    output: Tensor  # (B, T, H) the encoder's output after output dropout (for AR)
    raw_output: Tensor  # (B, T, H) before output dropout (for TAR)


class LanguageModel(nn.Module):
    r"""``p(w_t | w_<t)`` from an rnndrop LSTM or GRU (any scheme) or a causal transformer.

    ``e_t = E[w_t]`` (word types dropped with ``dropout.embedding``, Gal & Ghahramani
    2016), ``h = encoder(e)``, ``logits_t = W h_t + b``. With ``tie_weights`` the decoder
    shares the embedding matrix (Press & Wolf 2017; Inan et al. 2017); for the LSTM and GRU
    the last layer is then ``embedding_size`` wide, as in AWD-LSTM.

    Args:
        vocab_size: vocabulary (linked from the data module by the CLI).
        embedding_size: width of the embeddings.
        hidden_size: LSTM/GRU width, or the transformer's ``d_model``.
        num_layers: recurrent layers or transformer blocks.
        encoder: ``"lstm"``, ``"gru"``, ``"rnn"`` (tanh Elman RNN) or ``"transformer"``.
        dropout: the recurrent scheme, anything :func:`rnndrop.config.as_dropout` takes (a
            :class:`~rnndrop.config.RecurrentDropout`, a dict of its fields, a preset name,
            ``{"preset": name, **arguments}``, or a float with ``nn.LSTM``'s meaning); its
            ``embedding`` rate applies to every encoder. A site the GRU lacks
            (``zoneout_cell``) raises ``ValueError``. For the transformer, a
            :class:`~rnndrop.config.TransformerDropout` here is its dropout (one argument per
            encoder: :func:`~rnndrop.models.encoders.encoder_dropout`).
        transformer_dropout: the transformer's sites (a dict or config; or give them as
            ``dropout``).
        num_heads, ffn_size, positions, max_len: transformer shape.
        tie_weights: share the embedding and decoder weights.
        init_range: if set, every parameter ~ U(-r, r) (Zaremba et al. 2014 used 0.1 small,
            0.05 medium, 0.04 large); else embedding U(-0.1, 0.1), zero decoder bias, the
            encoder's own initialisation (pytorch/examples, AWD-LSTM).

    Shape:
        tokens ``(B, T)`` -> :class:`LMOutput` with logits ``(B, T, V)``.
    """

    def __init__(
        self,
        vocab_size: int = 10000,
        embedding_size: int = 200,
        hidden_size: int = 200,
        num_layers: int = 2,
        encoder: EncoderKind = "lstm",
        dropout: DropoutSpec | TransformerDropout = None,
        transformer_dropout: TransformerDropout | None = None,
        num_heads: int = 4,
        ffn_size: int | None = None,
        positions: str = "sinusoidal",
        max_len: int = 1024,
        tie_weights: bool = False,
        init_range: float | None = None,
    ) -> None:
        super().__init__()
        args = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        self.dropout, transformer_dropout = encoder_dropout(encoder, dropout, transformer_dropout)
        dropout = self.dropout
        # the constructor's arguments as plain data: hparams, and rebuilding from a checkpoint
        self.config = {**args, "dropout": dropout.to_dict(),
                       "transformer_dropout": transformer_dropout.to_dict()}  # fmt: skip
        if tie_weights and encoder == "transformer" and hidden_size != embedding_size:
            raise ValueError(
                "tie_weights with the transformer needs hidden_size == embedding_size, got "
                f"{hidden_size} and {embedding_size}"
            )
        self.embedding = EmbeddingDropout(
            vocab_size,
            embedding_size,
            dropout.embedding,
            per_sample=dropout.embedding_batch == "per_sample",
            batch_first=True,
            scaling=dropout.scaling,
        )
        self.encoder = build_encoder(
            encoder,
            embedding_size,
            hidden_size,
            num_layers,
            dropout,
            transformer_dropout,
            last_size=embedding_size if tie_weights else None,
            num_heads=num_heads,
            ffn_size=ffn_size,
            positions=positions,
            max_len=max_len,
        )
        self.decoder = nn.Linear(self.encoder.output_size, vocab_size)
        if tie_weights:
            self.decoder.weight = self.embedding.weight
        self.vocab_size, self.encoder_kind = vocab_size, encoder
        self._init(init_range)

    def _init(self, init_range: float | None) -> None:
        if init_range is not None:
            for name, p in self.named_parameters():
                if "dropout_logit" not in name:  # concrete dropout's rates keep their init
                    nn.init.uniform_(p, -init_range, init_range)
            return
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)

    def features(self, tokens: Tensor) -> Tensor:
        """What the encoder reads: ``(B, T)`` tokens -> ``(B, T, E)`` embeddings."""
        return self.embedding(tokens)

    def readout(self, out: Tensor) -> Tensor:
        """Encoder output ``(..., H)`` -> logits ``(..., V)``."""
        return self.decoder(out)

    def forward(self, tokens: Tensor, state: Any = None) -> LMOutput:
        out, raw, state = self.encoder(self.features(tokens), state)  # (B, T, H)
        return LMOutput(self.readout(out), state, out, raw)

    def last_logits(self, tokens: Tensor) -> Tensor:
        """``forward(tokens).logits[:, -1]``, ``(B, V)``, decoding the last position only: with
        a large vocabulary the decoder at every position is most of the cost (10k words: 4 of
        the 5 MFLOP per token of a 2x200 LSTM). A subclass that overrides ``forward`` gets its
        own forward's last position, never this shortcut past it."""
        if type(self).forward is not LanguageModel.forward:
            return self(tokens).logits[:, -1]
        out = self.encoder(self.features(tokens))[0]  # (B, T, H)
        return self.readout(out[:, -1])
