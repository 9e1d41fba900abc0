"""What only one cell has; the rest of each cell is tests/test_parity.py's.

- the LSTM's projections (``proj_size``): torch's parameters and its fused op, bitwise;
- the GRU's carry ``z ⊙ h_{t-1}``: a recurrent mask acts where ``h_{t-1}`` enters ``W_h*``
  and not there, written out by hand (independently of tests/reference.py).
"""

import itertools

import torch
from reference import reference_gru
from torch import nn

from rnndrop.config import RecurrentDropout as RD
from rnndrop.nn import GRU, LSTM

F64 = torch.float64


def test_lstm_proj_size_parameters_are_torchs():
    for layers, bidir, proj, bias in itertools.product([1, 3], [False, True], [0, 3],
                                                       [True, False]):  # fmt: skip
        ref = nn.LSTM(5, 7, layers, bias=bias, bidirectional=bidir, proj_size=proj)
        ours = LSTM(5, 7, layers, bias=bias, bidirectional=bidir, proj_size=proj)
        assert [(n, p.shape) for n, p in ref.named_parameters()] == [
            (n, p.shape) for n, p in ours.named_parameters()
        ]


def test_lstm_proj_size_fused_path_bitwise():
    ref = nn.LSTM(5, 7, 2, bidirectional=True, proj_size=3)
    ours = LSTM(5, 7, 2, bidirectional=True, proj_size=3)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(6, 3, 5, requires_grad=True)
    hx = (torch.randn(4, 3, 3, requires_grad=True), torch.randn(4, 3, 7, requires_grad=True))
    results = []
    for model in (ref, ours):
        out, (h, c) = model(x, hx)
        loss = out.square().sum() + h.sin().sum() + c.cos().sum()
        results.append([out, h, c, *torch.autograd.grad(loss, [x, *hx, *model.parameters()])])
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


def test_gru_recurrent_mask_does_not_touch_the_carry(loop_impl):
    """One step from h0 with a recurrent mask: the carry z ⊙ h0 sees the unmasked h0.

    A module that masked h0 in the carry too would give z ⊙ (m ⊙ h0) where m drops units;
    written out by hand here, independently of the reference."""
    gru = GRU(4, 6, dropout=RD(recurrent=0.5, time="per_step")).to(F64)
    gru.record_masks = True
    x = torch.randn(1, 3, 4, dtype=F64)
    h0 = torch.randn(1, 3, 6, dtype=F64)
    out, h = gru(x, h0)
    m = gru.last_masks["recurrent/l0"]  # (1, 1, 3, 6)
    assert (m == 0).any() and (m != 0).any()
    ref, rh, _ = reference_gru(gru, x, h0, gru.last_masks)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(h, rh, atol=1e-12, rtol=0)
    # and by hand, the carry with the unmasked h0
    w_ih, w_hh = gru.weight_ih_l0, gru.weight_hh_l0
    gx = x[0] @ w_ih.t() + gru.bias_ih_l0
    gh = (h0[0] * m[0, 0]) @ w_hh.t() + gru.bias_hh_l0
    r = torch.sigmoid(gx[:, :6] + gh[:, :6])
    z = torch.sigmoid(gx[:, 6:12] + gh[:, 6:12])
    n = torch.tanh(gx[:, 12:] + r * gh[:, 12:])
    torch.testing.assert_close(h[0], (1 - z) * n + z * h0[0], atol=1e-12, rtol=0)
