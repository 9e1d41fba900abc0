"""What only one cell has; the rest of each cell is tests/test_parity.py's.

- the LSTM's projections (``proj_size``): torch's parameters and its fused op, bitwise;
- the GRU's carry ``z ⊙ h_{t-1}``: a recurrent mask acts where ``h_{t-1}`` enters ``W_h*``
  and not there, written out by hand (independently of tests/reference.py);
- the LSTMs' cell site (Moon et al. 2015, ``c_t = d(f ⊙ c_{t-1} + i ⊙ g)``): a dropped
  unit's cell state is 0 at every step of its sequence, and cells without a cell state
  refuse the site, saying why.
"""

import itertools

import pytest
import torch
from reference import reference_gru
from torch import nn

from rnndrop.config import RecurrentDropout as RD
from rnndrop.nn import GRU, LSTM, RNN, GRUCell, LayerNormLSTM, LSTMCell, RNNCell

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


# ---- the cell site (Moon et al. 2015, RnnDrop) ---------------------------------------------


@pytest.mark.parametrize("time", ["per_sequence", "per_step"])
def test_cell_mask_zeroes_a_dropped_units_memory_at_every_step(time, loop_impl):
    """``c_t = d(f ⊙ c_{t-1} + i ⊙ g)``: with one mask per sequence (the paper's), a unit it
    drops has ``c_t = 0``, so ``h_t = o ⊙ tanh(0) = 0``, at every step; every kept unit is
    nonzero. Per step: exactly where that step's mask is 0."""
    torch.manual_seed(0)
    T, B, H = 7, 4, 16
    m = LSTM(3, H, dropout=RD.moon(0.5, time=time)).double()
    m.record_masks = True
    out, (_, c) = m(torch.randn(T, B, 3, dtype=torch.float64))
    mask = m.last_masks["cell/l0"]
    assert mask.shape == ((1 if time == "per_sequence" else T), B, H)
    dropped = (mask == 0).expand(T, B, H)
    assert 0 < dropped.sum() < dropped.numel()
    assert (out[dropped] == 0).all() and (out[~dropped] != 0).all()
    assert (c[0][dropped[-1]] == 0).all() and (c[0][~dropped[-1]] != 0).all()
    # kept units are scaled by 1/(1-p) = 2 (inverted dropout), not 1
    assert set(mask.unique().tolist()) == {0.0, 2.0}


def test_cell_mask_of_a_layernorm_lstm_and_a_step_cell_is_shared_over_time(loop_impl):
    """The same on the LayerNorm LSTM (its h reads LN(c), so only c is checked) and on
    ``LSTMCell`` stepped through one sequence: one mask for every step."""
    torch.manual_seed(1)
    T, B, H = 5, 3, 12
    ln = LayerNormLSTM(3, H, dropout=RD.moon(0.5)).double()
    ln.record_masks = True
    x = torch.randn(T, B, 3, dtype=torch.float64)
    for steps in range(1, T + 1):  # the final c of each prefix is c_t
        torch.manual_seed(2)  # the same mask for every prefix
        _, (_, c) = ln(x[:steps])
        dropped = ln.last_masks["cell/l0"][0] == 0
        assert dropped.any() and (c[0][dropped] == 0).all() and (c[0][~dropped] != 0).all()
    cell = LSTMCell(3, H, dropout=RD.moon(0.5)).double()
    state, masks = None, []
    with cell.sequence() as scope:
        for t in range(T):
            state = cell(x[t], state)
            masks.append(scope.cell)
            dropped = scope.cell == 0
            assert dropped.any() and (state[1][dropped] == 0).all()
            assert (state[1][~dropped] != 0).all()
    assert all(mk is masks[0] for mk in masks)


@pytest.mark.parametrize("make", [lambda d: GRU(3, 4, dropout=d), lambda d: RNN(3, 4, dropout=d),
                                  lambda d: GRUCell(3, 4, dropout=d),
                                  lambda d: RNNCell(3, 4, dropout=d)],
                         ids=["GRU", "RNN", "GRUCell", "RNNCell"])  # fmt: skip
def test_cells_without_a_cell_state_refuse_the_cell_site(make):
    for dropout in (RD(cell=0.3), {"cell": 0.3}, RD.moon(0.3), "moon"):
        with pytest.raises(ValueError, match=r"cell=0\.(3|25) have no meaning for a (GRU|RNN_TANH) "
                           r"\(it has no cell state\); set them to 0"):  # fmt: skip
            make(dropout)
