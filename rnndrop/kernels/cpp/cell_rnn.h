// rnndrop: the Elman RNN's pointwise math for the layer loop (loop.cpp), and its traits.
//
// Elman 1990 in torch's form (nn.RNN), one gate block, phi = tanh or relu; with the loop
// path's masks (rnndrop/nn/cells/rnn.py has the equations and the python reference these
// kernels mirror):
//   h~_t = phi(a_t),  a_t = xp_t + (h_{t-1} * m^h) W_hh^T   (both biases in xp_t)
//   h_t = z^h * h_{t-1} + (1 - z^h) * h~_t                   (zoneout on h)
// No cell state and no gated candidate: it reads zoneout_h alone (kStepMasks; config.SITES).
// One batch row, every pointer __restrict, no branches in the loop body (relu is a max,
// its derivative a select), so gcc vectorises them.
//
// Included by loop.cpp inside its namespace, after FwdRow / BwdRow and the math helpers.

#pragma once

template <typename T, bool RELU>
inline T rnn_phi(T a) {
  if constexpr (RELU) {
    return a < T(0) ? T(0) : a;  // written so that NaN passes through, as torch's relu
  } else {
    return ftanh(a);
  }
}

// ZH: zoneout on h is present (else h_t = h~_t and zh is not read).
template <typename T, bool RELU, bool ZH>
void rnn_row_forward(int64_t H, T* __restrict a, const T* __restrict bias,
                     const T* __restrict hp, const T* __restrict zh, T* __restrict h) {
  for (int64_t j = 0; j < H; ++j) {
    T ht = rnn_phi<T, RELU>(a[j] + bias[j]);
    a[j] = ht;
    if constexpr (ZH) {
      h[j] = zh[j] * hp[j] + (T(1) - zh[j]) * ht;
    } else {
      h[j] = ht;
    }
  }
}

// In: dh = total dL/dh_t. Out: g = dL/da; dh = zoneout's carry into h_{t-1}.
// MG: also write dL/dz_h of this step into dzh.
template <typename T, bool RELU, bool MG>
void rnn_row_backward(int64_t H, const T* __restrict a, const T* __restrict hp,
                      const T* __restrict zh, T* __restrict dh, T* __restrict g,
                      T* __restrict dzh) {
  for (int64_t j = 0; j < H; ++j) {
    T d = dh[j];
    T dht = d * (T(1) - zh[j]);
    T ht = a[j];
    T dphi;  // phi'(a) from the saved h~ = phi(a)
    if constexpr (RELU) {
      dphi = ht > T(0) ? T(1) : T(0);
    } else {
      dphi = T(1) - ht * ht;
    }
    g[j] = dht * dphi;
    if constexpr (MG) dzh[j] = d * (hp[j] - ht);
    dh[j] = d * zh[j];
  }
}

// The Elman RNN to the layer loop: the recurrent product is added into the input projection
// (both biases in b_x), the state is h alone, nothing saved beyond the activations.
template <bool RELU>
struct RnnCell {
  static constexpr const char* kName = RELU ? "rnn_relu" : "rnn_tanh";
  static constexpr int64_t G = 1;
  static constexpr bool kHasC = false;
  static constexpr bool kSplitRec = false;
  static constexpr bool kAux = false;
  static constexpr unsigned kStepMasks = step_mask::bits(step_mask::zoneout_h);

  template <typename T, bool MASKED>
  static void forward(int64_t H, const FwdRow<T>& r) {
    rnn_row_forward<T, RELU, MASKED>(H, r.a, r.bx, r.hp, r.m[step_mask::zoneout_h], r.h);
  }

  template <typename T, bool MG>
  static void backward(int64_t H, const BwdRow<T>& r) {
    rnn_row_backward<T, RELU, MG>(H, r.a, r.hp, r.m[step_mask::zoneout_h], r.dh, r.gx,
                                  r.dm[step_mask::zoneout_h]);
  }
};
