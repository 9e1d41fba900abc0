// rnndrop: the GRU's pointwise math for the layer loop (loop.cpp), and its traits.
//
// Cho et al. 2014 in torch's form, gates r z n; with the loop path's masks (rnndrop/nn/cells/
// gru.py has the equations and the python reference these kernels mirror line for line):
//   r, z = sigma(xp_r + hp_r), sigma(xp_z + hp_z),  n = tanh(xp_n + r * hp_n)
//   h~_t = (1 - z) * (n * m^n) + z * h_{t-1},  h_t = z^h * h_{t-1} + (1 - z^h) * h~_t
// As the LSTM's: one batch row, every pointer __restrict, no branches in the loop body.
// a* hold the input projection (its bias bx added here), p* the recurrent product
// (h_{t-1} * m) W_hh^T (its bias bh added here). MASKED adds the candidate mask and
// zoneout on h; without them the plain variant skips their loads.
//
// Included by loop.cpp inside its namespace, after FwdRow / BwdRow and the math helpers.

#pragma once


template <typename T, bool MASKED>
void gru_row_forward(int64_t H, T* __restrict ar, T* __restrict az, T* __restrict an,
                     const T* __restrict pr, const T* __restrict pz, const T* __restrict pn,
                     const T* __restrict bx, const T* __restrict bh, const T* __restrict hp,
                     const T* __restrict cm, const T* __restrict zh, T* __restrict hn_out,
                     T* __restrict h) {
  for (int64_t j = 0; j < H; ++j) {
    T r = fsigmoid((ar[j] + bx[j]) + (pr[j] + bh[j]));
    T z = fsigmoid((az[j] + bx[H + j]) + (pz[j] + bh[H + j]));
    T hn = pn[j] + bh[2 * H + j];
    T n = ftanh((an[j] + bx[2 * H + j]) + r * hn);
    ar[j] = r;
    az[j] = z;
    an[j] = n;
    hn_out[j] = hn;
    if constexpr (MASKED) {
      T nm = n * cm[j];
      T ht = nm + z * (hp[j] - nm);  // (1 - z) n + z h_{t-1}
      h[j] = zh[j] * hp[j] + (T(1) - zh[j]) * ht;
    } else {
      h[j] = n + z * (hp[j] - n);
    }
  }
}

// In: dh = total dL/dh_t. Out: gx* = dL/d(input projection), gh* = dL/d(recurrent product)
// (they differ in the n block: hp_n enters through r); dh = the direct gradient into
// h_{t-1} (the z carry and zoneout's).
// MG: also write dL/d(candidate mask) and dL/dz_h of this step into dcm, dzh.
template <typename T, bool MG>
void gru_row_backward(int64_t H, const T* __restrict ar, const T* __restrict az,
                      const T* __restrict an, const T* __restrict hn, const T* __restrict hp,
                      const T* __restrict cm, const T* __restrict zh, T* __restrict dh,
                      T* __restrict gxr, T* __restrict gxz, T* __restrict gxn,
                      T* __restrict ghr, T* __restrict ghz, T* __restrict ghn,
                      T* __restrict dcm, T* __restrict dzh) {
  for (int64_t j = 0; j < H; ++j) {
    T d = dh[j];
    T dht = d * (T(1) - zh[j]);
    T r = ar[j], z = az[j], n = an[j];
    T nm = n * cm[j];
    T gn = dht * (T(1) - z) * cm[j] * (T(1) - n * n);
    T gr = gn * hn[j] * (r * (T(1) - r));
    T gz = dht * (hp[j] - nm) * (z * (T(1) - z));
    gxr[j] = gr;
    gxz[j] = gz;
    gxn[j] = gn;
    ghr[j] = gr;
    ghz[j] = gz;
    ghn[j] = gn * r;
    if constexpr (MG) {
      dcm[j] = dht * (T(1) - z) * n;
      dzh[j] = d * (hp[j] - (nm + z * (hp[j] - nm)));
    }
    dh[j] = dht * z + d * zh[j];
  }
}

// The GRU to the layer loop: hp = h W_hh^T + b_hh stays apart from the input projection
// (b_hn sits inside r * hp_n), hp_n is saved per step (aux), and the state is h alone.
struct GruCell {
  static constexpr const char* kName = "gru";
  static constexpr int64_t G = 3;
  static constexpr bool kHasC = false;
  static constexpr bool kSplitRec = true;
  static constexpr bool kAux = true;
  static constexpr unsigned kStepMasks = step_mask::bits(step_mask::candidate,
                                                         step_mask::zoneout_h);

  template <typename T, bool MASKED>
  static void forward(int64_t H, const FwdRow<T>& r) {
    using namespace step_mask;
    T* a = r.a;
    const T* p = r.p;
    gru_row_forward<T, MASKED>(H, a, a + H, a + 2 * H, p, p + H, p + 2 * H, r.bx, r.bh, r.hp,
                               r.m[candidate], r.m[zoneout_h], r.aux, r.h);
  }

  template <typename T, bool MG>
  static void backward(int64_t H, const BwdRow<T>& r) {
    using namespace step_mask;
    const T* a = r.a;
    gru_row_backward<T, MG>(H, a, a + H, a + 2 * H, r.aux, r.hp, r.m[candidate],
                            r.m[zoneout_h], r.dh, r.gx, r.gx + r.gxs, r.gx + 2 * r.gxs, r.gh,
                            r.gh + r.ghs, r.gh + 2 * r.ghs, r.dm[candidate], r.dm[zoneout_h]);
  }
};
