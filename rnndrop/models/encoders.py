"""The encoders models are built on: an rnndrop LSTM, GRU or RNN stack, or the causal
transformer.

Every encoder takes batch-first input and a state, and returns ``(output, pre_dropout, state)``;
the transformer carries no state (``None``). Which one a model uses is its ``encoder``:
``"lstm"``, ``"gru"``, ``"rnn"`` (tanh Elman RNN; a :class:`RecurrentStack` of that cell) or
``"transformer"``.
"""

from __future__ import annotations

from typing import Any, Literal

from torch import Tensor, nn

from ..config import DropoutSpec, RecurrentDropout, TransformerDropout, as_dropout
from ..nn import GRU, LSTM, RNN, CausalTransformer, LayerNormLSTM, RNNBase

__all__ = [
    "ENCODERS",
    "RECURRENT_CELLS",
    "EncoderKind",
    "RecurrentStack",
    "TransformerEncoder",
    "build_encoder",
    "encoder_dropout",
]

EncoderKind = Literal["lstm", "gru", "rnn", "layernorm_lstm", "transformer"]

#: the recurrent cells a :class:`RecurrentStack` is built of, by encoder name
RECURRENT_CELLS: dict[str, type[RNNBase]] = {"lstm": LSTM, "gru": GRU, "rnn": RNN,
                                             "layernorm_lstm": LayerNormLSTM}  # fmt: skip
ENCODERS: tuple[str, ...] = (*RECURRENT_CELLS, "transformer")


def encoder_dropout(
    encoder: str,
    dropout: DropoutSpec | TransformerDropout,
    transformer_dropout: TransformerDropout | dict[str, Any] | None = None,
) -> tuple[RecurrentDropout, TransformerDropout]:
    """A model's ``(recurrent, transformer)`` dropout configs from its arguments.

    ``dropout`` is the encoder's scheme, whatever the encoder: anything
    :func:`rnndrop.config.as_dropout` takes, or a :class:`~rnndrop.config.TransformerDropout`
    for the transformer (then the recurrent config is "none", as when it came as
    ``transformer_dropout``, so the model's recorded config is the same either way).
    ``transformer_dropout`` stays for dicts (YAML, the command line).
    """
    if isinstance(dropout, TransformerDropout):
        if encoder in RECURRENT_CELLS:
            raise ValueError(f"dropout: a TransformerDropout is for the transformer encoder, "
                             f"not {encoder!r}; give a RecurrentDropout")  # fmt: skip
        if transformer_dropout:
            raise ValueError("give the transformer's dropout once: as dropout or as "
                             "transformer_dropout, not both")  # fmt: skip
        return RecurrentDropout(), dropout
    recurrent = as_dropout(dropout, encoder)  # GRU zoneout: on h
    return recurrent, TransformerDropout.from_dict(transformer_dropout or {})


class RecurrentStack(nn.Module):
    """``num_layers`` rnndrop LSTM or GRU layers whose last one may be narrower (AWD tying).

    With ``last_size == hidden_size`` this is one :class:`rnndrop.nn.LSTM` (or
    :class:`rnndrop.nn.GRU`). Otherwise it is a ``num_layers - 1``-layer network followed by a
    one-layer network of width ``last_size``, with the scheme split so that every mask acts
    exactly once where the single network would put it: the first part's output mask is the
    between-layers mask.

    State: the cell's state, ``(h, c)`` for the LSTM and ``h`` for the GRU, for one part; a
    list of them (one per part) for two.

    Args:
        cell: ``"lstm"``, ``"gru"``, ``"rnn"`` (tanh) or ``"layernorm_lstm"``.
        dropout: the scheme (already a :class:`~rnndrop.config.RecurrentDropout`). A site
            that means nothing for the cell (``zoneout_cell`` for the GRU) raises the
            ``ValueError`` of :class:`rnndrop.nn.GRU`.
    """

    def __init__(
        self,
        cell: str,
        input_size: int,
        hidden_size: int,
        num_layers: int,
        dropout: RecurrentDropout,
        last_size: int | None = None,
    ) -> None:
        super().__init__()
        if cell not in RECURRENT_CELLS:
            raise ValueError(f"cell must be one of {list(RECURRENT_CELLS)}, got {cell!r}")
        rnn = RECURRENT_CELLS[cell]
        if dropout.embedding > 0:  # the model's site (EmbeddingDropout): layers warn of it
            dropout = dropout.replace(embedding=0.0, embedding_batch="per_batch")
        last = last_size or hidden_size
        if last == hidden_size or num_layers == 1:
            width = last if num_layers == 1 else hidden_size
            parts = [rnn(input_size, width, num_layers, batch_first=True, dropout=dropout)]
        else:
            inner = dropout.between_layers if num_layers > 2 else 0.0  # 1 layer: no use
            first = dropout.replace(output=dropout.between_layers, between_layers=inner)
            second = dropout.replace(input=0.0, between_layers=0.0)
            parts = [
                rnn(input_size, hidden_size, num_layers - 1, batch_first=True, dropout=first),
                rnn(hidden_size, last, 1, batch_first=True, dropout=second),
            ]
        self.cell = cell
        self.parts = nn.ModuleList(parts)
        self.output_size = last

    def forward(self, x: Tensor, state: Any = None) -> tuple[Tensor, Tensor, Any]:
        if state is None:
            states = [None] * len(self.parts)
        else:
            states = [state] if len(self.parts) == 1 else list(state)
        new = []
        for rnn, s in zip(self.parts, states, strict=True):
            x, final, pre = rnn(x, s, return_pre_dropout=True)
            new.append(final)
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
) -> RecurrentStack | TransformerEncoder:
    """An encoder by name; ``hidden_size`` is the transformer's ``d_model``."""
    if kind in RECURRENT_CELLS:
        return RecurrentStack(kind, input_size, hidden_size, num_layers, dropout, last_size)
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
    raise ValueError(f"encoder must be one of {list(ENCODERS)}, got {kind!r}")
