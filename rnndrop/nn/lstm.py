"""``rnndrop.nn.LSTM``: ``torch.nn.LSTM`` with every recurrent dropout scheme."""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import _VF, Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from .. import _ext
from ..config import RecurrentDropout
from .cells import lstm_layer
from .dropout import StochasticModule
from .masks import ForwardMasks, is_active, needs_loop
from .workspace import WeightBuffers

__all__ = ["LSTM"]


@torch.compiler.disable  # as nn.LSTM under dynamo: inductor cannot lower this op
def _fused_lstm(*args):
    """The fused ATen/cuDNN LSTM op, with nn.LSTM's arguments."""
    if not args[0].is_cuda:
        return _VF.lstm(*args)
    with warnings.catch_warnings():
        # cuDNN copies weights that are not views of one buffer (dropped weights never
        # are); the copy is what weight drop needs, so its warning says nothing here
        warnings.filterwarnings("ignore", message="RNN module weights are not part")
        return _VF.lstm(*args)


DropoutSpec = RecurrentDropout | Mapping[str, Any] | str | float | None


def as_dropout(dropout: DropoutSpec) -> RecurrentDropout:
    """Turn what users pass as ``dropout`` into a :class:`RecurrentDropout`.

    Accepts a config, a dict of its fields, a preset name (``"variational"``), ``None``
    (no dropout) or a float, which means what it means for ``torch.nn.LSTM``: per-step
    dropout on the outputs of every layer but the last.
    """
    if dropout is None:
        return RecurrentDropout()
    if isinstance(dropout, RecurrentDropout):
        return dropout
    if isinstance(dropout, str):
        return RecurrentDropout.preset(dropout)
    if isinstance(dropout, Mapping):
        return RecurrentDropout.from_dict(dropout)
    if isinstance(dropout, numbers.Real) and not isinstance(dropout, bool):
        return RecurrentDropout(between_layers=float(dropout), time="per_step")
    raise TypeError(
        "dropout must be a RecurrentDropout, a dict of its fields, a preset name, a float or "
        f"None; got {type(dropout).__name__}"
    )


class LSTM(StochasticModule):
    r"""A drop-in ``torch.nn.LSTM`` carrying every recurrent dropout scheme.

    Computes, for each layer and step (torch's equations and gate order i, f, g, o)::

        i, f, g, o = σ, σ, tanh, σ (W_ih x_t + b_ih + W_hh h_{t-1} + b_hh)
        c_t = f ⊙ c_{t-1} + i ⊙ g
        h_t = o ⊙ tanh(c_t)

    with the dropout sites of ``dropout`` (:class:`rnndrop.config.RecurrentDropout`)
    applied where they act. Parameter names, shapes, initialisation and state_dicts are
    those of ``torch.nn.LSTM``; with no dropout active the fused ATen/cuDNN op runs with
    the same arguments, so outputs are bitwise equal.

    Two execution paths, chosen per layer and forward:

    * fused: input/between/output masks of any policy, weight drop and per-batch
      per-sequence recurrent masks (folded into the columns of ``W_hh``) leave the
      recurrence intact, so the fused op runs with the dropped weights passed in;
    * loop: per-sample or per-step recurrent masks, candidate dropout and zoneout
      need the time loop of :mod:`rnndrop.nn.cells` (compiled C++ on CPU when it can
      be built, pure PyTorch otherwise), with backprop through time written by hand.

    Masks are sampled in training, or in eval when ``mc`` is true (Monte Carlo dropout,
    see :func:`rnndrop.nn.mc_dropout`); otherwise inference is deterministic:
    inverted dropout is the identity, classic scaling multiplies by ``1-p``, zoneout
    uses its expectation.

    Args:
        input_size: features of ``x``.
        hidden_size: features of ``h`` and ``c``.
        num_layers: stacked layers.
        bias: use ``b_ih`` and ``b_hh``.
        batch_first: input and output are ``(B, T, *)``.
        dropout: a :class:`~rnndrop.config.RecurrentDropout`, a dict of its fields, a
            preset name, or a float (``nn.LSTM``'s meaning: per-step dropout between
            layers).
        bidirectional: run a second, reversed direction per layer.
        proj_size: LSTM with projections (fused-path schemes only).

    Shape:
        - input: ``(T, B, H_in)``, ``(B, T, H_in)`` with ``batch_first``, ``(T, H_in)``
          unbatched, or a ``PackedSequence``.
        - hx: optional ``(h_0, c_0)``, each ``(D·num_layers, B, H_out)`` /
          ``(D·num_layers, B, H)``; zeros if absent.
        - output: ``(T, B, D·H_out)`` (as the input's layout), ``(h_n, c_n)`` as hx.
          With ``return_pre_dropout=True`` a third item: the output before output dropout.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: DropoutSpec = None,
        bidirectional: bool = False,
        proj_size: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, value, low in (
            ("input_size", input_size, 1),
            ("hidden_size", hidden_size, 1),
            ("num_layers", num_layers, 1),
            ("proj_size", proj_size, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if proj_size >= hidden_size:
            raise ValueError(
                f"proj_size must be smaller than hidden_size, got {proj_size} >= {hidden_size}"
            )
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.bias, self.batch_first = bool(bias), bool(batch_first)
        self.bidirectional, self.proj_size = bool(bidirectional), proj_size
        self.dropout = as_dropout(dropout)
        self.mc = False
        self.force_loop = False  # run the time loop even where the fused op would do
        self.record_masks = False  # keep the last forward's masks in self.last_masks
        self.last_masks: dict[str, Tensor] = {}
        self._workspace = WeightBuffers()  # storage reused by per-call weights (CPU)
        self._check_dropout()

        kw = {"device": device, "dtype": dtype}
        H, D, P = hidden_size, self.num_directions, proj_size
        out = P or H
        self._flat_weights_names: list[str] = []
        for layer in range(num_layers):
            for d in range(D):
                sfx = f"_l{layer}" + ("_reverse" if d else "")
                shapes = {
                    "weight_ih": (4 * H, input_size if layer == 0 else out * D),
                    "weight_hh": (4 * H, out),
                }
                if self.bias:
                    shapes.update(bias_ih=(4 * H,), bias_hh=(4 * H,))
                if P:
                    shapes["weight_hr"] = (P, H)
                for name, shape in shapes.items():
                    self.register_parameter(name + sfx, nn.Parameter(torch.empty(shape, **kw)))
                    self._flat_weights_names.append(name + sfx)
        self.reset_parameters()

    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    @property
    def all_weights(self) -> list[list[nn.Parameter]]:
        n = len(self._flat_weights_names) // (self.num_layers * self.num_directions)
        w = self._flat_weights
        return [w[i : i + n] for i in range(0, len(w), n)]

    @property
    def _flat_weights(self) -> list[Tensor]:
        return [getattr(self, n) for n in self._flat_weights_names]

    def reset_parameters(self) -> None:
        """``nn.LSTM``'s initialisation: every parameter ~ U(-1/√H, 1/√H)."""
        stdv = 1.0 / math.sqrt(self.hidden_size)
        for weight in self.parameters():
            nn.init.uniform_(weight, -stdv, stdv)

    def flatten_parameters(self) -> None:
        """On CUDA, make the weights views of one cuDNN buffer, as ``nn.LSTM`` does.

        cuDNN then uses them in place instead of copying them every call. A no-op on
        CPU, for mixed dtypes/devices, or where torch no longer offers the call.
        """
        w = self._flat_weights
        first = w[0]
        if not first.is_cuda or len({p.data_ptr() for p in w}) != len(w):
            return
        if any(p.dtype != first.dtype or not torch.backends.cudnn.is_acceptable(p) for p in w):
            return
        try:
            import torch.backends.cudnn.rnn as cudnn_rnn

            with torch.cuda.device_of(first), torch.no_grad():
                if torch._use_cudnn_rnn_flatten_weight():
                    torch._cudnn_rnn_flatten_weight(
                        w,
                        (4 if self.bias else 2) + (1 if self.proj_size else 0),
                        self.input_size,
                        cudnn_rnn.get_cudnn_mode("LSTM"),
                        self.hidden_size,
                        self.proj_size,
                        self.num_layers,
                        self.batch_first,
                        self.bidirectional,
                    )
        except (AttributeError, RuntimeError):  # private API moved: copying still works
            return

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        if self.__dict__.get("_workspace") is not None:  # absent if pickled by older versions
            self._workspace.clear()
        self.flatten_parameters()
        return out

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        for name, default in (("bias", True), ("batch_first", False), ("bidirectional", False)):
            if getattr(self, name) != default:
                s += f", {name}={getattr(self, name)}"
        if self.proj_size:
            s += f", proj_size={self.proj_size}"
        return s + f", dropout={self.dropout.describe()}"

    def _check_dropout(self) -> None:
        cfg = self.dropout
        if self.num_layers == 1 and cfg.between_layers > 0 and not is_active(cfg, 1, True):
            warnings.warn(
                f"LSTM: between_layers={cfg.between_layers} does nothing with num_layers=1 and "
                "no other rate is set: this LSTM trains without dropout (use input/output for "
                "a single layer)",
                UserWarning,
                stacklevel=3,
            )
        if self.proj_size and any(needs_loop(cfg, layer, s) for layer in (0, 1) for s in (0, 1)):
            raise ValueError(
                "LSTM: proj_size > 0 is supported with fused-path schemes only (input, "
                "between_layers and output masks, weight_hh, per-batch per-sequence recurrent "
                f"masks); this config needs the loop path: {cfg.describe()}"
            )

    # ---- forward --------------------------------------------------------------------

    def forward(
        self,
        input: Tensor | PackedSequence,
        hx: tuple[Tensor, Tensor] | None = None,
        *,
        return_pre_dropout: bool = False,
    ):
        packed = isinstance(input, PackedSequence)
        if packed:
            x, batch_sizes, sorted_idx, unsorted_idx = input
            B, batched, batch_dim = int(batch_sizes[0]), True, 1
        else:
            if input.dim() not in (2, 3):
                raise ValueError(f"LSTM: Expected input to be 2D or 3D, got {input.dim()}D instead")
            batched, batch_dim = input.dim() == 3, 0 if self.batch_first else 1
            x = input if batched else input.unsqueeze(batch_dim)
            B, batch_sizes, sorted_idx, unsorted_idx = x.shape[batch_dim], None, None, None
        h0, c0 = self._initial_state(x, hx, B, batched, batch_sizes, sorted_idx)
        sample = self.sampling

        if not is_active(self.dropout, self.num_layers, sample):  # exactly what nn.LSTM runs
            args = (h0, c0), self._flat_weights, self.bias, self.num_layers, 0.0, self.training
            if packed:
                out, h_n, c_n = _fused_lstm(x, batch_sizes, *args, self.bidirectional)
            else:
                out, h_n, c_n = _fused_lstm(x, *args, self.bidirectional, self.batch_first)
            pre = out
        else:
            if packed:
                xs, lengths = pad_packed_sequence(PackedSequence(x, batch_sizes))
            else:
                xs, lengths = (x.transpose(0, 1) if self.batch_first else x), None
            out, h_n, c_n, pre = self._forward_dropout(xs, h0, c0, lengths, sample)
            if packed:
                out = pack_padded_sequence(out, lengths).data
                pre = pack_padded_sequence(pre, lengths).data if return_pre_dropout else None
            elif self.batch_first:
                out, pre = out.transpose(0, 1), pre.transpose(0, 1)

        if unsorted_idx is not None:
            h_n, c_n = h_n.index_select(1, unsorted_idx), c_n.index_select(1, unsorted_idx)
        if packed:
            out = PackedSequence(out, batch_sizes, sorted_idx, unsorted_idx)
            if return_pre_dropout:
                pre = PackedSequence(pre, batch_sizes, sorted_idx, unsorted_idx)
        elif not batched:
            out, pre = out.squeeze(batch_dim), pre.squeeze(batch_dim)
            h_n, c_n = h_n.squeeze(1), c_n.squeeze(1)
        if return_pre_dropout:
            return out, (h_n, c_n), pre
        return out, (h_n, c_n)

    def _initial_state(self, x, hx, B, batched, batch_sizes, sorted_idx):
        """torch's checks and defaults for (h_0, c_0), permuted for packed input."""
        w = self.weight_ih_l0
        if x.dtype != w.dtype and not torch.is_autocast_enabled():
            raise ValueError(
                f"RNN input dtype ({x.dtype}) does not match weight dtype ({w.dtype}). "
                f"Convert input: input.to({w.dtype}), or convert model: model.to({x.dtype})"
            )
        if x.size(-1) != self.input_size:
            raise RuntimeError(
                "input.size(-1) must be equal to input_size. "
                f"Expected {self.input_size}, got {x.size(-1)}"
            )
        LD, H = self.num_layers * self.num_directions, self.hidden_size
        H_out = self.proj_size or H
        if hx is None:
            zeros = {"dtype": x.dtype, "device": x.device}
            return torch.zeros(LD, B, H_out, **zeros), torch.zeros(LD, B, H, **zeros)
        if not isinstance(hx, tuple | list) or len(hx) != 2:
            raise RuntimeError("LSTM: hx must be a tuple (h_0, c_0)")
        h0, c0 = hx
        want = 3 if batched else 2
        if h0.dim() != want or c0.dim() != want:
            kind = "batched 3-D" if batched else "unbatched 2-D"
            raise RuntimeError(
                f"For {kind} input, hx and cx should also be {want}-D but got "
                f"({h0.dim()}-D, {c0.dim()}-D) tensors"
            )
        if not batched:
            h0, c0 = h0.unsqueeze(1), c0.unsqueeze(1)
        for i, (t, size) in enumerate(((h0, (LD, B, H_out)), (c0, (LD, B, H)))):
            if tuple(t.shape) != size:
                raise RuntimeError(f"Expected hidden[{i}] size {size}, got {list(t.shape)}")
            if (t.dtype, t.device) != (x.dtype, x.device) and not torch.is_autocast_enabled():
                raise ValueError(
                    f"LSTM: hx[{i}] is {t.dtype} on {t.device} but the input is {x.dtype} on "
                    f"{x.device}; convert the state: hx[{i}].to(input)"
                )
        if sorted_idx is not None:
            h0, c0 = h0.index_select(1, sorted_idx), c0.index_select(1, sorted_idx)
        return h0, c0

    def _forward_dropout(self, x, h0, c0, lengths, sample):
        """The masked forward on time-major padded ``x`` (T, B, F), batch in sorted order."""
        T, B, _ = x.shape
        L, D, cfg = self.num_layers, self.num_directions, self.dropout
        if sample and x.device.type == "cpu":
            _ext.load()  # build on first use: fast masks and the compiled loop
        record = {} if self.record_masks else None
        pool = self.__dict__.get("_workspace")  # absent in modules pickled by older versions
        m = ForwardMasks(cfg, T, B, self.hidden_size, x, sample, record, pool)
        loop = [self.force_loop or needs_loop(cfg, layer, sample) for layer in range(L)]
        if not any(loop) and not (L > 1 and m.input_rate(1) > 0):  # one fused call
            x, fold = m.input(0, x)
            weights = [w for layer in range(L) for w in self._fused_weights(m, layer, fold)]
            out, h_n, c_n = self._fused(x, h0, c0, weights, L, lengths)
        else:
            hs, cs = [], []
            for layer in range(L):
                x, xmask = m.input(layer, x)
                sl = slice(layer * D, (layer + 1) * D)
                if loop[layer]:
                    x, h, c = self._loop_layer(m, layer, x, xmask, h0[sl], c0[sl], lengths)
                else:
                    weights = self._fused_weights(m, layer, xmask)
                    x, h, c = self._fused(x, h0[sl], c0[sl], weights, 1, lengths)
                hs.append(h)
                cs.append(c)
            out, h_n, c_n = x, torch.cat(hs), torch.cat(cs)
        if record is not None:
            self.last_masks = record
        return m.output(out), h_n, c_n, out

    def _fused(self, x, h0, c0, weights, num_layers, lengths):
        args = (h0, c0), weights, self.bias, num_layers, 0.0, self.training, self.bidirectional
        if lengths is None:
            return _fused_lstm(x, *args, False)
        packed = pack_padded_sequence(x, lengths)
        out, h_n, c_n = _fused_lstm(packed.data, packed.batch_sizes, *args)
        out, _ = pad_packed_sequence(PackedSequence(out, packed.batch_sizes), total_length=len(x))
        return out, h_n, c_n

    def _fused_weights(self, m: ForwardMasks, layer: int, fold: Tensor | None) -> list[Tensor]:
        weights = []
        for d in range(self.num_directions):
            w_ih, w_hh, *rest = self._params(layer, d)
            # untied per-batch input masks fold into W_ih: one column mask per gate
            weights += [m.weight_ih(layer, d, w_ih, fold), m.weight_hh(layer, d, w_hh), *rest]
        return weights

    def _loop_layer(self, m: ForwardMasks, layer, x, xmask, h0, c0, lengths):
        pad = None
        if lengths is not None:  # zoneout weight 1 past each end: the state is carried
            steps = torch.arange(m.T, device=x.device)[:, None]
            pad = (steps >= lengths.to(x.device)[None, :]).unsqueeze(-1)  # (T, B, 1)
        outs, hn, cn = [], [], []
        for d in range(self.num_directions):
            w_ih, w_hh, *b = self._params(layer, d)
            bias = b[0] + b[1] if self.bias else None
            in_mask = None
            if xmask is not None and not m.folds:  # untied per-sample masks: one per gate
                in_mask = xmask
            elif xmask is not None:
                w_ih = m.weight_ih(layer, d, w_ih, xmask)
            h_seq, c_last = lstm_layer(
                x,
                w_ih,
                bias,
                m.weight_hh(layer, d, w_hh),
                h0[d],
                c0[d],
                in_mask=in_mask,
                rec_mask=m.recurrent(layer, d),
                cand_mask=m.candidate(layer, d),
                zone_h=m.zoneout("hidden", layer, d, pad),
                zone_c=m.zoneout("cell", layer, d, pad),
                reverse=d == 1,
            )
            outs.append(h_seq)
            hn.append(h_seq[0] if d else h_seq[-1])
            cn.append(c_last)
        return torch.cat(outs, -1), torch.stack(hn), torch.stack(cn)

    def _params(self, layer: int, d: int) -> list[Tensor]:
        n = len(self._flat_weights_names) // (self.num_layers * self.num_directions)
        i = (layer * self.num_directions + d) * n
        return [getattr(self, name) for name in self._flat_weights_names[i : i + n]]
