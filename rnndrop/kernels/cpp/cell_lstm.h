// rnndrop: the LSTM's pointwise math for the layer loop (loop.cpp), and its traits.
//
// Hochreiter & Schmidhuber 1997 in torch's form, gates i f g o; with the loop path's masks
// (rnndrop/nn/cells/lstm.py has the equations and the python reference, step_forward /
// step_backward, that these kernels mirror line for line):
//   c~_t = m^k * (f * c_{t-1} + i * (g * m^c))    m^c: candidate mask (Semeniuta et al.)
//   h~_t = o * tanh(c~_t)                          m^k: cell mask (Moon et al. 2015)
//   c_t = z^c * c_{t-1} + (1 - z^c) * c~_t,  h_t = z^h * h_{t-1} + (1 - z^h) * h~_t  (zoneout)
// Kernels over one batch row of H units. They take every pointer __restrict and have no
// branches in the loop body, so gcc vectorises them; an absent mask is passed as a row of
// ones (candidate, cell, recurrent) or zeros (zoneout).
//
// Included by loop.cpp inside its namespace, after FwdRow / BwdRow and the math helpers.

#pragma once


template <typename T>
void lstm_row_forward(int64_t H, T* __restrict ai, T* __restrict af, T* __restrict ag,
                      T* __restrict ao, const T* __restrict bias, const T* __restrict cp,
                      T* __restrict c, T* __restrict h) {
  for (int64_t j = 0; j < H; ++j) {  // no masks: the common fused-math case
    T i = fsigmoid(ai[j] + bias[j]);
    T f = fsigmoid(af[j] + bias[H + j]);
    T g = ftanh(ag[j] + bias[2 * H + j]);
    T o = fsigmoid(ao[j] + bias[3 * H + j]);
    ai[j] = i;
    af[j] = f;
    ag[j] = g;
    ao[j] = o;
    T cn = f * cp[j] + i * g;
    c[j] = cn;
    h[j] = o * ftanh(cn);
  }
}

template <typename T>
void lstm_row_forward_masked(int64_t H, T* __restrict ai, T* __restrict af, T* __restrict ag,
                             T* __restrict ao, const T* __restrict bias, const T* __restrict cp,
                             const T* __restrict hp, const T* __restrict cm,
                             const T* __restrict km, const T* __restrict zh,
                             const T* __restrict zc, T* __restrict c, T* __restrict h,
                             T* __restrict ct) {
  for (int64_t j = 0; j < H; ++j) {
    T i = fsigmoid(ai[j] + bias[j]);
    T f = fsigmoid(af[j] + bias[H + j]);
    T g = ftanh(ag[j] + bias[2 * H + j]);
    T o = fsigmoid(ao[j] + bias[3 * H + j]);
    ai[j] = i;
    af[j] = f;
    ag[j] = g;
    ao[j] = o;
    T cn = (f * cp[j] + i * (g * cm[j])) * km[j];
    T hn = o * ftanh(cn);
    ct[j] = cn;
    c[j] = zc[j] * cp[j] + (T(1) - zc[j]) * cn;
    h[j] = zh[j] * hp[j] + (T(1) - zh[j]) * hn;
  }
}

// lstm_row_backward without step masks (every one absent: the same numbers, fewer loads)
template <typename T>
void lstm_row_backward_plain(int64_t H, const T* __restrict ai, const T* __restrict af,
                             const T* __restrict ag, const T* __restrict ao,
                             const T* __restrict cp, const T* __restrict ctp, T* __restrict dh,
                             T* __restrict dc, T* __restrict gi, T* __restrict gf,
                             T* __restrict gg, T* __restrict go) {
  for (int64_t j = 0; j < H; ++j) {
    T d = dh[j];
    T tc = ftanh(ctp[j]);
    T i = ai[j], f = af[j], g = ag[j], o = ao[j];
    T dct = dc[j] + d * o * (T(1) - tc * tc);  // dL/dc~_t
    gi[j] = dct * g * i * (T(1) - i);
    gf[j] = dct * cp[j] * f * (T(1) - f);
    gg[j] = dct * i * (T(1) - g * g);
    go[j] = d * tc * o * (T(1) - o);
    dc[j] = dct * f;
    dh[j] = T(0);
  }
}

// In: dh = total dL/dh_t, dc = dL/dc_t. Out: dgates; dc = dL/dc_{t-1} (cell path);
// dh = zoneout carry into h_{t-1}.
// MG (mask gradients): also write dL/d(candidate mask), dL/d(cell mask), dL/dz_h, dL/dz_c
// of this step into dcm, dkm, dzh, dzc (scratch rows where a mask is absent); hp is h_{t-1}
// (read only with MG).
template <typename T, bool MG>
void lstm_row_backward(int64_t H, const T* __restrict ai, const T* __restrict af,
                       const T* __restrict ag, const T* __restrict ao, const T* __restrict cp,
                       const T* __restrict ctp, const T* __restrict cm, const T* __restrict km,
                       const T* __restrict zh, const T* __restrict zc, T* __restrict dh,
                       T* __restrict dc, T* __restrict gi, T* __restrict gf,
                       T* __restrict gg, T* __restrict go, const T* __restrict hp,
                       T* __restrict dcm, T* __restrict dkm, T* __restrict dzh,
                       T* __restrict dzc) {
  for (int64_t j = 0; j < H; ++j) {
    T d = dh[j];
    T dc_in = dc[j];
    T dht = d * (T(1) - zh[j]);
    T tc = ftanh(ctp[j]);
    T i = ai[j], f = af[j], g = ag[j], o = ao[j];
    T dct = dc_in * (T(1) - zc[j]) + dht * o * (T(1) - tc * tc);  // dL/dc~_t
    T dcn = dct * km[j];  // dL/d(f * c_{t-1} + i * g * m^c)
    gi[j] = dcn * (g * cm[j]) * i * (T(1) - i);
    gf[j] = dcn * cp[j] * f * (T(1) - f);
    gg[j] = dcn * i * cm[j] * (T(1) - g * g);
    go[j] = dht * tc * o * (T(1) - o);
    if constexpr (MG) {
      dcm[j] = dcn * i * g;
      dkm[j] = dct * (f * cp[j] + i * (g * cm[j]));
      dzh[j] = d * (hp[j] - o * tc);
      dzc[j] = dc_in * (cp[j] - ctp[j]);
    }
    dc[j] = dcn * f + dc_in * zc[j];
    dh[j] = d * zh[j];
  }
}

// The LSTM to the layer loop: the recurrent product is added into the gates' input
// projection (both biases are in b_x), and the state is (h, c).
struct LstmCell {
  static constexpr const char* kName = "lstm";
  static constexpr int64_t G = 4;
  static constexpr bool kHasC = true;
  static constexpr bool kSplitRec = false;
  static constexpr bool kAux = false;
  static constexpr unsigned kStepMasks = step_mask::bits(
      step_mask::candidate, step_mask::cell, step_mask::zoneout_h, step_mask::zoneout_c);

  template <typename T, bool MASKED>
  static void forward(int64_t H, const FwdRow<T>& r) {
    using namespace step_mask;
    T* a = r.a;
    if constexpr (MASKED) {
      lstm_row_forward_masked<T>(H, a, a + H, a + 2 * H, a + 3 * H, r.bx, r.cp, r.hp,
                                 r.m[candidate], r.m[cell], r.m[zoneout_h], r.m[zoneout_c],
                                 r.c, r.h, r.ct);
    } else {  // no masks: the common fused-math case
      lstm_row_forward<T>(H, a, a + H, a + 2 * H, a + 3 * H, r.bx, r.cp, r.c, r.h);
    }
  }

  template <typename T, bool MG>
  static void backward(int64_t H, const BwdRow<T>& r) {
    using namespace step_mask;
    const T* a = r.a;
    if constexpr (!MG) {
      if (!r.masked) {
        lstm_row_backward_plain<T>(H, a, a + H, a + 2 * H, a + 3 * H, r.cp, r.ct, r.dh, r.dc,
                                   r.gx, r.gx + r.gxs, r.gx + 2 * r.gxs, r.gx + 3 * r.gxs);
        return;
      }
    }
    lstm_row_backward<T, MG>(H, a, a + H, a + 2 * H, a + 3 * H, r.cp, r.ct, r.m[candidate],
                             r.m[cell], r.m[zoneout_h], r.m[zoneout_c], r.dh, r.dc, r.gx,
                             r.gx + r.gxs, r.gx + 2 * r.gxs, r.gx + 3 * r.gxs, r.hp,
                             r.dm[candidate], r.dm[cell], r.dm[zoneout_h], r.dm[zoneout_c]);
  }
};
