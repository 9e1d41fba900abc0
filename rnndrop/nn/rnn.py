"""The recurrent engine: ``RNNBase`` (layers, directions, packing, state, masks) and the
drop-in ``torch.nn.LSTM`` and ``torch.nn.GRU`` built on it."""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from ..config import SITES, DropoutSpec, as_dropout
from ..functional import concrete_logit, concrete_logit_init
from ..kernels import fused_dtype, rnn_layer
from ..kernels.cpp import build as _ext
from ..kernels.reference import transform_active
from .cells import GRU_CELL, LSTM_CELL, Cell
from .dropout import StochasticModule, script_refusal
from .masks import ForwardMasks, _layer_sites, is_active, needs_loop
from .workspace import WeightBuffers

__all__ = ["GRU", "LSTM", "RNNBase", "concrete_rates", "concrete_regularizer"]


class RNNBase(StochasticModule):
    r"""Layers, directions, packing, state and masks, written once for every cell.

    Like ``torch.nn.RNNBase(mode)``: a subclass names its :class:`~rnndrop.nn.cells.Cell`
    (gate count, state, fused op, per-step math) and the rest is shared. Two execution
    paths, chosen per layer and forward:

    * fused: input/between/output masks of any policy, weight drop and per-batch
      per-sequence recurrent masks (folded into the columns of ``W_hh``) leave the
      recurrence intact, so the fused ATen/cuDNN op runs with the dropped weights;
    * loop: per-sample or per-step recurrent masks, candidate and cell dropout and zoneout
      need the time loop of a loop backend (:mod:`rnndrop.kernels`: compiled C++ on CPU when
      it can be built, the PyTorch reference elsewhere), backprop through time by hand.

    Where a fast loop backend cannot serve (a ``torch.func`` transform or forward-mode AD,
    ``torch.export``/ONNX/``jit.trace``, a compiled eval-mode graph, ``proj_size`` with a
    loop-path scheme), loop layers run the plain-autograd reference loop
    (:mod:`rnndrop.kernels.reference`, the same masks and math), and double backward
    (``create_graph=True``) differentiates it. ``jit.script`` and tracing or exporting a
    model that samples masks refuse with an error that names what works.

    Masks are sampled in training, or in eval when ``mc`` is true (Monte Carlo dropout,
    see :func:`rnndrop.nn.mc_dropout`); otherwise inference is deterministic: inverted
    dropout is the identity, classic scaling multiplies by ``1-p``, zoneout uses its
    expectation. With ``record_masks = True`` the masks of the last forward are kept in
    ``last_masks`` by site name (see :class:`rnndrop.nn.masks.ForwardMasks`); a forward
    that draws none leaves it empty.

    Concrete dropout (``RecurrentDropout(..., concrete=True)``, Gal, Hron & Kendall 2017):
    each site of the layer with a rate gets a learnable parameter ``dropout_logit_<site>``
    (0-dim, shared by all layers and directions; the rate is
    :func:`~rnndrop.functional.concrete_logit` of it, in (0.001, 0.999)), masks are relaxed
    Bernoulli samples in training, and every loop backend returns the gradient of the masks
    it applies inside the time loop. :meth:`concrete_rates` reads the rates,
    :meth:`concrete_regularizer` is the paper's regulariser to add to the loss.
    """

    cell: Cell

    def __init__(
        self,
        cell: Cell,
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
        self.cell = cell
        self.mode = cell.mode
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.bias, self.batch_first = bool(bias), bool(batch_first)
        self.bidirectional, self.proj_size = bool(bidirectional), proj_size
        self.dropout = as_dropout(dropout, cell.name)  # a preset read for this cell
        self.mc = False
        self.force_loop = False  # run the time loop even where the fused op would do
        self.record_masks = False  # keep the last forward's masks in self.last_masks
        self.last_masks: dict[str, Tensor] = {}
        self._workspace = WeightBuffers()  # storage reused by per-call weights (CPU)
        self._check_dropout()

        kw = {"device": device, "dtype": dtype}
        H, D, P, G = hidden_size, self.num_directions, proj_size, cell.gates
        out = P or H
        self._flat_weights_names: list[str] = []
        for layer in range(num_layers):
            for d in range(D):
                sfx = f"_l{layer}" + ("_reverse" if d else "")
                shapes = {
                    "weight_ih": (G * H, input_size if layer == 0 else out * D),
                    "weight_hh": (G * H, out),
                }
                if self.bias:
                    shapes.update(bias_ih=(G * H,), bias_hh=(G * H,))
                if P:
                    shapes["weight_hr"] = (P, H)
                for name, units, _ in cell.extra_params:  # a cell's own (LayerNorm gains)
                    shapes[name] = (units * H,)
                for name, shape in shapes.items():
                    self.register_parameter(name + sfx, nn.Parameter(torch.empty(shape, **kw)))
                    self._flat_weights_names.append(name + sfx)
        # concrete dropout: one learnable rate per site of the layer (not the embedding's)
        self._concrete_sites: list[str] = []
        if self.dropout.concrete:
            self._concrete_sites = _layer_sites(self.dropout, None, num_layers)
            for site in self._concrete_sites:
                self.register_parameter(f"dropout_logit_{site}",
                                        nn.Parameter(torch.empty((), **kw)))  # fmt: skip
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
        """torch's initialisation: every weight ~ U(-1/√H, 1/√H); a cell's extra parameters
        (``Cell.extra_params``) to their initial value; learned rates (concrete dropout)
        back to the config's rates."""
        stdv = 1.0 / math.sqrt(self.hidden_size)
        extra = {name: value for name, _, value in self.cell.extra_params}
        for name, weight in zip(self._flat_weights_names, self._flat_weights, strict=True):
            value = extra.get(name.split("_l")[0])
            if value is None:
                nn.init.uniform_(weight, -stdv, stdv)
            else:
                nn.init.constant_(weight, value)
        with torch.no_grad():
            for site in self.__dict__.get("_concrete_sites", ()):
                theta = concrete_logit_init(getattr(self.dropout, site))
                getattr(self, f"dropout_logit_{site}").fill_(theta)

    # ---- concrete dropout -----------------------------------------------------------

    def _learned_logits(self) -> dict[str, Tensor]:
        return {s: concrete_logit(getattr(self, f"dropout_logit_{s}"))
                for s in self.__dict__.get("_concrete_sites", ())}  # fmt: skip

    def concrete_parameters(self) -> dict[str, nn.Parameter]:
        """The learned-rate parameters by site (empty without concrete dropout).

        Keep them out of weight decay: decay pulls every logit to 0, i.e. every rate to 0.5.
        """
        return {s: getattr(self, f"dropout_logit_{s}")
                for s in self.__dict__.get("_concrete_sites", ())}  # fmt: skip

    def concrete_rates(self) -> dict[str, float]:
        """The current rate of every learned site, e.g. ``{"recurrent": 0.23, ...}``."""
        return {s: float(torch.sigmoid(v.detach())) for s, v in self._learned_logits().items()}

    def concrete_regularizer_terms(
        self,
        dataset_size: int,
        length_scale: float = 1e-4,
        *,
        output_weight: Tensor | None = None,
        weight_regularizer: float | None = None,
        dropout_regularizer: float | None = None,
    ) -> dict[str, tuple[Tensor, Tensor]]:
        r"""The concrete-dropout regulariser per learned site: ``{site: (weight, entropy)}``.

        Gal, Hron & Kendall 2017 (eq. 3 and §3): the objective is
        ``(1/M) Σ_i −log p(y_i | x_i) + (1/N) Σ_sites KL``, and for a dropout site of rate
        ``p`` feeding a weight matrix ``M`` (the weights without dropout), with ``K`` units
        dropped,

        .. math::

            \frac{1}{N}\mathrm{KL} \approx \frac{l^2 (1-p)}{2N} \lVert M \rVert^2
            - \frac{K}{N} \mathcal{H}(p),\qquad
            \mathcal{H}(p) = -p\log p - (1-p)\log(1-p).

        Here kept units are scaled by ``1/(1-p)`` (inverted dropout), so the weights ``W``
        of the module are ``(1-p) M`` and the weight term is ``l²‖W‖² / (2N(1-p))`` (the
        paper's code writes ``weight_regularizer · ‖W‖² / (1-p)``). Returned per site:

        - weight term ``weight_regularizer · Σ_W ‖W‖² / (1 − p)``,
          ``weight_regularizer = l²/(2N)`` by default;
        - entropy term ``dropout_regularizer · K · (p log p + (1−p) log(1−p))`` (negative),
          ``dropout_regularizer = 1/N`` by default.

        The defaults fit a loss that is a mean negative log-likelihood (cross-entropy); the
        paper's regression code, with a Gaussian likelihood of precision ``τ`` and a mean
        squared error, uses ``l²/(τN)`` and ``2/(τN)``: pass those as the two overrides.

        What each site feeds (summed over layers and directions; biases are not included):

        ======================  ==================================  =====================
        site                    weights ``W``                       ``K``
        ======================  ==================================  =====================
        input                   ``weight_ih_l0*``                   ``input_size`` each
        between_layers          ``weight_ih_l{1..}*``               their input features
        recurrent               ``weight_hh_l*``                    their input features
        weight_hh (DropConnect) ``weight_hh_l*``                    their element count
        output                  ``output_weight`` (if given)        output features
        candidate, cell         none (no weight after the mask)     ``hidden_size`` each
        zoneout_*               none                                ``hidden_size`` each
        ======================  ==================================  =====================

        The output site feeds the layer that reads the LSTM's output (a decoder, outside
        this module): pass its weight as ``output_weight``, else the site has the entropy
        term only. Candidate dropout and zoneout feed no weight matrix; zoneout is not
        dropout at all, and its entropy term (which alone pulls a rate to 0.5) is an
        extension of the paper, not in it.

        Args:
            dataset_size: ``N``, training examples (sequences, or tokens for a language
                model, matching how the loss is averaged).
            length_scale: ``l``, the prior length-scale (1e-4 in the paper's code).
            output_weight: the weight the output site feeds, or None.
            weight_regularizer, dropout_regularizer: override the two coefficients.
        """
        if isinstance(dataset_size, bool) or not isinstance(dataset_size, int) or dataset_size < 1:
            raise ValueError(f"dataset_size must be a positive integer, got {dataset_size!r}")
        N = float(dataset_size)
        wr = length_scale**2 / (2 * N) if weight_regularizer is None else weight_regularizer
        dr = 1.0 / N if dropout_regularizer is None else dropout_regularizer
        L, D = self.num_layers, self.num_directions
        H, out = self.hidden_size, self.proj_size or self.hidden_size
        terms = {}
        for site, logit in self._learned_logits().items():
            p = torch.sigmoid(logit)
            logsig = nn.functional.logsigmoid
            neg_entropy = p * logsig(logit) + (1 - p) * logsig(-logit)  # −H(p), stable
            weights: list[Tensor] = []
            if site in ("input", "between_layers", "recurrent", "weight_hh"):
                layers = {"input": [0], "between_layers": range(1, L)}.get(site, range(L))
                kind = "weight_ih" if SITES[site].layers in ("first", "inner") else "weight_hh"
                for layer in layers:
                    for d in range(D):
                        sfx = f"_l{layer}" + ("_reverse" if d else "")
                        weights.append(getattr(self, kind + sfx))
            elif site == "output" and output_weight is not None:
                weights.append(output_weight)
            if site == "weight_hh":
                K = sum(w.numel() for w in weights)
            elif site in ("input", "between_layers", "recurrent"):
                K = sum(w.shape[1] for w in weights)
            elif site == "output":
                K = D * out
            else:
                K = L * D * H
            sq = sum((w * w).sum() for w in weights) if weights else logit.new_zeros(())
            terms[site] = (wr * sq / (1 - p), dr * K * neg_entropy)
        return terms

    def concrete_regularizer(
        self,
        dataset_size: int,
        length_scale: float = 1e-4,
        *,
        output_weight: Tensor | None = None,
        weight_regularizer: float | None = None,
        dropout_regularizer: float | None = None,
    ) -> Tensor:
        """The sum of :meth:`concrete_regularizer_terms` over sites (0 without concrete
        dropout): add it to the loss."""
        terms = self.concrete_regularizer_terms(
            dataset_size, length_scale, output_weight=output_weight,
            weight_regularizer=weight_regularizer, dropout_regularizer=dropout_regularizer,
        )  # fmt: skip
        total = self.weight_hh_l0.new_zeros(())
        for w, e in terms.values():
            total = total + w + e
        return total

    def flatten_parameters(self) -> None:
        """On CUDA, make the weights views of one cuDNN buffer, as torch's RNNs do.

        cuDNN then uses them in place instead of copying them every call. A no-op on
        CPU, for mixed dtypes/devices, or where torch no longer offers the call.
        """
        w = self._flat_weights
        first = w[0]
        if self.cell.fused is None or not first.is_cuda or len({p.data_ptr() for p in w}) != len(w):
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
                        cudnn_rnn.get_cudnn_mode(self.mode),
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
        cfg, kind = self.dropout, type(self).__name__
        cfg.check_cell(self.cell.name, kind)
        cfg.warn_model_sites(kind, stacklevel=4)
        if self.num_layers == 1 and cfg.between_layers > 0 and not is_active(cfg, 1, True):
            warnings.warn(
                f"{kind}: between_layers={cfg.between_layers} does nothing with num_layers=1 "
                "and no other rate is set: this layer trains without dropout (use "
                "input/output for a single layer)",
                UserWarning,
                stacklevel=4,
            )

    # ---- export and tracing ---------------------------------------------------------

    def __prepare_scriptable__(self) -> nn.Module:
        """``torch.jit.script`` calls this first: refuse with the alternatives."""
        raise script_refusal(self)

    def _check_traceable(self, sample: bool) -> None:
        """A trace records the masks of the traced call as constants: refuse (see
        :meth:`~rnndrop.nn.dropout.StochasticModule._refuse_frozen_masks`)."""
        active = is_active(self.dropout, self.num_layers, sample)
        self._refuse_frozen_masks(active)
        if sample and active and torch.compiler.is_exporting():
            # mask seeds are drawn as Python ints: export stops on them with an obscure
            # data-dependent error; say what works instead
            raise RuntimeError(
                f"{type(self).__name__}: torch.export of a model that samples dropout masks "
                "(training or mc mode) is not supported: masks are drawn from Python-side "
                "seeds. Export in eval mode (model.eval()), where every scheme is "
                "deterministic."
            )

    # ---- forward --------------------------------------------------------------------

    def forward(self, input: Tensor | PackedSequence, hx=None, return_pre_dropout: bool = False):
        # return_pre_dropout is not keyword-only: the legacy ONNX exporter passes every
        # defaulted parameter positionally
        packed = isinstance(input, PackedSequence)
        if packed:
            x, batch_sizes, sorted_idx, unsorted_idx = input
            B, batched, batch_dim = int(batch_sizes[0]), True, 1
        else:
            if input.dim() not in (2, 3):
                raise ValueError(
                    f"{type(self).__name__}: Expected input to be 2D or 3D, got "
                    f"{input.dim()}D instead"
                )
            batched, batch_dim = input.dim() == 3, 0 if self.batch_first else 1
            x = input if batched else input.unsqueeze(batch_dim)
            B, batch_sizes, sorted_idx, unsorted_idx = x.shape[batch_dim], None, None, None
            if x.shape[1 - batch_dim] == 0:  # torch's message, on every path
                raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
        state = self._initial_state(x, hx, B, batched, sorted_idx)
        sample = self.sampling
        self._check_traceable(sample)
        record: dict[str, Tensor] | None = {} if self.record_masks else None
        # torch.func: vmap has no rule for the fused ops, so every layer runs the loop, which
        # kernels.rnn_layer then runs as the plain-autograd reference (same math)
        force = self.force_loop or _functorch_active(x, self.weight_hh_l0)
        # torch.compile of an eval-mode model with gradients on: inductor cannot compile the
        # fused op's backward, so every layer runs the reference loop (0 graph breaks)
        reference = (not sample and torch.compiler.is_compiling()
                     and not torch.compiler.is_exporting() and torch.is_grad_enabled())  # fmt: skip
        fused = self.cell.fused is not None  # a cell without one always runs the loop
        force = force or reference or not fused

        if fused and (B == 0 or not (force or is_active(self.dropout, self.num_layers, sample))):
            # exactly what torch's module runs (an empty batch has nothing to mask)
            out, state = self.cell.fused(
                x, batch_sizes, state, self._flat_weights, self.bias, self.num_layers,
                self.training, self.bidirectional, self.batch_first,
            )  # fmt: skip
            pre = out
        else:
            if packed:
                xs, lengths = pad_packed_sequence(PackedSequence(x, batch_sizes))
            else:
                xs, lengths = (x.transpose(0, 1) if self.batch_first else x), None
            out, state, pre = self._forward_dropout(xs, state, lengths, sample, record, force,
                                                    reference)  # fmt: skip
            if packed:
                out = pack_padded_sequence(out, lengths).data
                pre = pack_padded_sequence(pre, lengths).data if return_pre_dropout else None
            elif self.batch_first:
                out, pre = out.transpose(0, 1), pre.transpose(0, 1)
        if record is not None:
            if unsorted_idx is not None:  # the masks were drawn in sorted order: the caller's
                record = {k: _unsort(k, m, unsorted_idx) for k, m in record.items()}
            self.last_masks = record  # exactly this forward's masks (none drawn: empty)

        if unsorted_idx is not None:
            state = tuple(s.index_select(1, unsorted_idx) for s in state)
        if packed:
            out = PackedSequence(out, batch_sizes, sorted_idx, unsorted_idx)
            if return_pre_dropout:
                pre = PackedSequence(pre, batch_sizes, sorted_idx, unsorted_idx)
        elif not batched:
            out, pre = out.squeeze(batch_dim), pre.squeeze(batch_dim)
            state = tuple(s.squeeze(1) for s in state)
        result = (out, state if self.cell.has_cell else state[0])
        return (*result, pre) if return_pre_dropout else result

    def _state_sizes(self, B: int) -> list[tuple[int, ...]]:
        LD, H = self.num_layers * self.num_directions, self.hidden_size
        sizes = [(LD, B, self.proj_size or H)]
        if self.cell.has_cell:
            sizes.append((LD, B, H))
        return sizes

    def _initial_state(self, x, hx, B, batched, sorted_idx) -> tuple[Tensor, ...]:
        """torch's checks and defaults for the initial state, permuted for packed input."""
        kind, w = type(self).__name__, self.weight_ih_l0
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
        sizes = self._state_sizes(B)
        if hx is None:
            return tuple(torch.zeros(size, dtype=x.dtype, device=x.device) for size in sizes)
        if self.cell.has_cell:
            if not isinstance(hx, tuple | list) or len(hx) != 2:
                raise RuntimeError(f"{kind}: hx must be a tuple (h_0, c_0)")
            state = tuple(hx)
        else:
            if not isinstance(hx, Tensor):
                raise RuntimeError(f"{kind}: hx must be a tensor h_0, got {type(hx).__name__}")
            state = (hx,)
        want = 3 if batched else 2
        if any(s.dim() != want for s in state):
            kind_in = "batched 3-D" if batched else "unbatched 2-D"
            dims = ", ".join(f"{s.dim()}-D" for s in state)
            raise RuntimeError(
                f"For {kind_in} input, hx should also be {want}-D but got ({dims}) tensors"
            )
        if not batched:
            state = tuple(s.unsqueeze(1) for s in state)
        for i, (t, size) in enumerate(zip(state, sizes, strict=True)):
            if tuple(t.shape) != size:
                what = f"hidden[{i}] size" if self.cell.has_cell else "hidden size"
                raise RuntimeError(f"Expected {what} {size}, got {list(t.shape)}")
            if (t.dtype, t.device) != (x.dtype, x.device) and not torch.is_autocast_enabled():
                name = f"hx[{i}]" if self.cell.has_cell else "hx"
                raise ValueError(
                    f"{kind}: {name} is {t.dtype} on {t.device} but the input is {x.dtype} on "
                    f"{x.device}; convert the state: {name}.to(input)"
                )
        if sorted_idx is not None:
            state = tuple(s.index_select(1, sorted_idx) for s in state)
        return state

    def _forward_dropout(self, x, state, lengths, sample, record, force=False, reference=False):
        """The masked forward on time-major padded ``x`` (T, B, F), batch in sorted order."""
        T, B, _ = x.shape
        L, D, cfg = self.num_layers, self.num_directions, self.dropout
        compiling = torch.compiler.is_compiling()
        if sample and x.device.type == "cpu" and not compiling:  # (a lock: a graph break)
            _ext.load()  # build on first use: fast masks and the compiled loop
        pool = self.__dict__.get("_workspace")  # absent in modules pickled by older versions
        if compiling:  # pooled storage is eager-only (a lock and in-place reuse): plain ops
            pool = None
        m = ForwardMasks(cfg, T, B, self.hidden_size, x, sample, record, pool, self.cell.gates,
                         learned=self._learned_logits(), relaxed=self.training,
                         out_size=self.proj_size or None)  # fmt: skip
        loop = [force or needs_loop(cfg, layer, sample, L) for layer in range(L)]
        if not any(loop) and not (L > 1 and m.input_rate(1) > 0):  # one fused call
            x, fold = m.input(0, x)
            # the folded (untied per-batch) input masks are layer 0's: W_ih_l0 only
            weights = [w for layer in range(L)
                       for w in self._fused_weights(m, layer, None if layer else fold)]  # fmt: skip
            out, state = self._fused(x, state, weights, L, lengths)
        else:
            finals = []
            for layer in range(L):
                x, xmask = m.input(layer, x)
                part = tuple(s[layer * D : (layer + 1) * D] for s in state)
                if loop[layer]:
                    x, part = self._loop_layer(m, layer, x, xmask, part, lengths, reference)
                else:
                    weights = self._fused_weights(m, layer, xmask)
                    x, part = self._fused(x, part, weights, 1, lengths)
                finals.append(part)
            out, state = x, tuple(torch.cat(parts) for parts in zip(*finals, strict=True))
        out_m = m.output(out)
        if torch.is_autocast_enabled(x.device.type):
            # the dtype nn.LSTM/GRU return under autocast (masks are drawn in x's dtype)
            want = fused_dtype(self.cell, x, self.weight_ih_l0.dtype)
            out_m, out = out_m.to(want), out.to(want)
            state = tuple(s.to(want) for s in state)
        return out_m, state, out

    def _fused(self, x, state, weights, num_layers, lengths):
        args = (state, weights, self.bias, num_layers, self.training, self.bidirectional, False)
        if lengths is None:
            return self.cell.fused(x, None, *args)
        packed = pack_padded_sequence(x, lengths)
        out, state = self.cell.fused(packed.data, packed.batch_sizes, *args)
        out, _ = pad_packed_sequence(PackedSequence(out, packed.batch_sizes), total_length=len(x))
        return out, state

    def _fused_weights(self, m: ForwardMasks, layer: int, fold: Tensor | None) -> list[Tensor]:
        weights = []
        for d in range(self.num_directions):
            w_ih, w_hh, *rest = self._params(layer, d)
            # untied per-batch input masks fold into W_ih: one column mask per gate
            weights += [m.weight_ih(layer, d, w_ih, fold), m.weight_hh(layer, d, w_hh), *rest]
        return weights

    def _loop_layer(self, m: ForwardMasks, layer, x, xmask, state, lengths, reference=False):
        pad = None
        if lengths is not None:  # zoneout weight 1 past each end: the state is carried
            steps = torch.arange(m.T, device=x.device)[:, None]
            pad = (steps >= lengths.to(x.device)[None, :]).unsqueeze(-1)  # (T, B, 1)
        has_cell = self.cell.has_cell
        outs, finals = [], []
        n_extra = len(self.cell.extra_params)
        for d in range(self.num_directions):
            w_ih, w_hh, *b = self._params(layer, d)
            params = b[len(b) - n_extra :]  # a cell's own parameters come last
            b = b[: len(b) - n_extra]
            w_hr = b.pop() if self.proj_size else None  # weight_hr comes after the biases
            b_x, b_h = self.cell.split_bias(*b) if self.bias else (None, None)
            extra = ()
            if n_extra:
                extra = self.cell.extra_inputs(*(b if self.bias else (None, None)), *params)
            in_mask = None
            if xmask is not None and not m.folds:  # untied per-sample masks: one per gate
                in_mask = xmask
            elif xmask is not None:
                w_ih = m.weight_ih(layer, d, w_ih, xmask)
            masks = m.loop_masks(layer, d, in_mask, has_cell, pad)
            h_seq, c_last = rnn_layer(
                self.cell, x, w_ih, b_x, m.weight_hh(layer, d, w_hh), b_h, state[0][d],
                state[1][d] if has_cell else None, masks, reverse=d == 1,
                reference=reference or None, w_hr=w_hr, extra=extra,
            )  # fmt: skip
            outs.append(h_seq)
            finals.append((h_seq[0] if d else h_seq[-1], c_last)[: 2 if has_cell else 1])
        out = outs[0] if len(outs) == 1 else torch.cat(outs, -1)  # a cat of one still copies
        return out, tuple(torch.stack(s) for s in zip(*finals, strict=True))

    def _params(self, layer: int, d: int) -> list[Tensor]:
        n = len(self._flat_weights_names) // (self.num_layers * self.num_directions)
        i = (layer * self.num_directions + d) * n
        return [getattr(self, name) for name in self._flat_weights_names[i : i + n]]


def _unsort(name: str, mask: Tensor, unsorted_idx: Tensor) -> Tensor:
    """A recorded mask in the caller's batch order (every site's batch dim is ``-2``)."""
    if name.startswith("weight_hh") or mask.shape[-2] == 1:  # not per sample
        return mask
    return mask.index_select(-2, unsorted_idx.to(mask.device))


def _functorch_active(*tensors: Tensor) -> bool:
    """True under a ``torch.func`` transform (grad, vmap, jacrev, ...) or forward-mode AD."""
    if torch.compiler.is_compiling():  # dynamo traces the ops themselves
        return False
    return transform_active(*tensors)


class LSTM(RNNBase):
    r"""A drop-in ``torch.nn.LSTM`` carrying every recurrent dropout scheme.

    Computes, for each layer and step (torch's equations and gate order i, f, g, o;
    Hochreiter & Schmidhuber 1997)::

        i, f, g, o = σ, σ, tanh, σ (W_ih x_t + b_ih + W_hh h_{t-1} + b_hh)
        c_t = f ⊙ c_{t-1} + i ⊙ g
        h_t = o ⊙ tanh(c_t)

    with the dropout sites of ``dropout`` (:class:`rnndrop.config.RecurrentDropout`)
    applied where they act (:mod:`rnndrop.nn.cells.lstm` has the loop path's step with
    every mask). Parameter names, shapes, initialisation and state_dicts are those of
    ``torch.nn.LSTM``; with no dropout active the fused ATen/cuDNN op runs with the same
    arguments, so outputs are bitwise equal. Execution paths, mask recording and
    inference modes: :class:`RNNBase`.

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
        proj_size: LSTM with projections, ``h_t = W_hr (o ⊙ tanh c_t)``. Fused-path
            schemes run torch's fused op; loop-path schemes (per-sample recurrent masks,
            Semeniuta, zoneout) run the plain-autograd reference loop
            (:mod:`rnndrop.kernels.reference`: correct, slower than the compiled loop), since
            no loop backend has the projection step. Recurrent and hidden zoneout masks act
            on the projected ``h``.

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
        super().__init__(LSTM_CELL, input_size, hidden_size, num_layers, bias, batch_first,
                         dropout, bidirectional, proj_size, device, dtype)  # fmt: skip


class GRU(RNNBase):
    r"""A drop-in ``torch.nn.GRU`` carrying every recurrent dropout scheme that means
    something for a GRU.

    Computes, for each layer and step (torch's equations and gate order r, z, n;
    Cho et al. 2014)::

        r = σ(W_ir x_t + b_ir + W_hr h_{t-1} + b_hr)
        z = σ(W_iz x_t + b_iz + W_hz h_{t-1} + b_hz)
        n = tanh(W_in x_t + b_in + r ⊙ (W_hn h_{t-1} + b_hn))
        h_t = (1 - z) ⊙ n + z ⊙ h_{t-1}

    Dropout sites (:class:`rnndrop.config.RecurrentDropout`) in their GRU form
    (:mod:`rnndrop.nn.cells.gru` has the step with every mask): ``input``,
    ``between_layers``, ``output`` as for the LSTM; ``recurrent`` masks ``h_{t-1}`` where it
    enters ``W_h*`` (one mask, or one per gate block r, z, n when untied: Gal & Ghahramani
    2016), never in the carry ``z ⊙ h_{t-1}``; ``candidate`` masks ``n`` (Semeniuta et al.
    2016); ``weight_hh`` drops elements of ``W_hh``; ``zoneout_hidden`` acts on ``h``.
    ``cell`` and ``zoneout_cell`` raise a ``ValueError``: a GRU has no cell state. Parameter
    names, shapes, initialisation and state_dicts are ``torch.nn.GRU``'s; with no dropout active
    the fused op runs with the same arguments (bitwise equal outputs).

    Args:
        input_size: features of ``x``.
        hidden_size: features of ``h``.
        num_layers: stacked layers.
        bias: use ``b_ih`` and ``b_hh``.
        batch_first: input and output are ``(B, T, *)``.
        dropout: a :class:`~rnndrop.config.RecurrentDropout`, a dict of its fields, a
            preset name, or a float (``nn.GRU``'s meaning: per-step dropout between layers).
        bidirectional: run a second, reversed direction per layer.

    Shape:
        - input: ``(T, B, H_in)``, ``(B, T, H_in)`` with ``batch_first``, ``(T, H_in)``
          unbatched, or a ``PackedSequence``.
        - hx: optional ``h_0`` ``(D·num_layers, B, H)``; zeros if absent.
        - output: ``(T, B, D·H)`` (as the input's layout), ``h_n`` as hx. With
          ``return_pre_dropout=True`` a third item: the output before output dropout.
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
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(GRU_CELL, input_size, hidden_size, num_layers, bias, batch_first,
                         dropout, bidirectional, 0, device, dtype)  # fmt: skip


# ---- concrete dropout over a whole model ----------------------------------------------------


def _recurrent_modules(model: nn.Module) -> list[tuple[str, RNNBase]]:
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, RNNBase) and m.concrete_parameters()]  # fmt: skip


def concrete_rates(model: nn.Module) -> dict[str, float]:
    """The learned rates of every :class:`RNNBase` in ``model`` (concrete dropout).

    Keys are ``"<site>"`` for a model that is itself the layer, else ``"<module path>/<site>"``
    (e.g. ``"encoder.parts.0/recurrent"``): ready for TensorBoard as ``dropout_rate/<key>``.
    """
    return {(f"{name}/{site}" if name else site): rate
            for name, m in _recurrent_modules(model)
            for site, rate in m.concrete_rates().items()}  # fmt: skip


def concrete_regularizer(
    model: nn.Module,
    dataset_size: int,
    length_scale: float = 1e-4,
    *,
    output_weight: Tensor | None = None,
    weight_regularizer: float | None = None,
    dropout_regularizer: float | None = None,
) -> Tensor:
    """The sum of :meth:`RNNBase.concrete_regularizer` over every recurrent module of ``model``.

    ``output_weight`` (the decoder's weight) goes to the last of them in module order, the
    one whose output the decoder reads; a module whose output feeds another recurrent module
    gets that module's first ``W_ih`` for its output site. Returns a 0-dim zero (on the
    model's first parameter's device) when no module learns rates.
    """
    mods = _recurrent_modules(model)
    first = next(model.parameters(), None)
    total = torch.zeros((), device=None if first is None else first.device)
    for k, (_, m) in enumerate(mods):
        w = output_weight if k == len(mods) - 1 else mods[k + 1][1].weight_ih_l0
        total = total + m.concrete_regularizer(
            dataset_size, length_scale, output_weight=w,
            weight_regularizer=weight_regularizer, dropout_regularizer=dropout_regularizer,
        )  # fmt: skip
    return total
