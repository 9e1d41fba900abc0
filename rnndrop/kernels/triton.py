"""The ``triton`` loop backend: GPU kernels for the loop path (not in this version).

The contract (:mod:`rnndrop.kernels.contract`) is what it will implement; until then
asking for it by name says so, and ``auto`` passes over it.
"""

from __future__ import annotations

from .contract import Grads, LayerInputs, Saved

__all__ = ["TritonBackend"]


class TritonBackend:
    name = "triton"

    def unavailable(self, inp: LayerInputs) -> str | None:
        return "the triton loop kernels are not part of this rnndrop version yet"

    def forward(self, inp: LayerInputs) -> Saved:  # pragma: no cover - never selected
        raise NotImplementedError

    def backward(self, inp, saved, dh_seq, dc_last, need_x, need_w) -> Grads:  # pragma: no cover
        raise NotImplementedError
