// rnndrop: the LayerNorm LSTM's pointwise math for the layer loop (loop.cpp), and its traits.
//
// Ba et al. 2016 in haste's form, gates i f g o; with the loop path's masks
// (rnndrop/nn/cells/layernorm_lstm.py has the equations and the python reference,
// step_forward / step_backward, that these kernels mirror):
//   a = LN(xp; gx) + LN(hp; gh) + b          over the 4H gate vector, no shift
//   c~_t = m^k * (f * c_{t-1} + i * (g * m^c)),  h~_t = o * tanh(LN(c~_t; gc, bc))
//   (m^c: candidate mask, Semeniuta et al.; m^k: cell mask, Moon et al. 2015)
//   c_t = z^c * c_{t-1} + (1 - z^c) * c~_t,  h_t = z^h * h_{t-1} + (1 - z^h) * h~_t
// LN(v) = gain * (v - mean) * rstd + shift, rstd = 1 / sqrt(var + 1e-5), biased variance.
// The cell's parameters arrive packed in `ex` (14H: b, gx, gh (4H each), gc, bc (H each));
// the row it saves (`sv`, 9H + 3) holds x^, h^ (4H each), c^ (H) and the three rstd.
// A row is reduced (mean, variance) before it is normalised, so each kernel is a few passes
// over the row; masks arrive as rows of ones / zeros where absent, so there is one variant.
//
// Included by loop.cpp inside its namespace, after FwdRow / BwdRow and the math helpers.

#pragma once

constexpr double kLnEps = 1e-5;

// y = (v - mean(v)) * rstd over n; returns rstd.
template <typename T>
T ln_normalise(int64_t n, const T* __restrict v, T* __restrict y) {
  T s = T(0);
  for (int64_t j = 0; j < n; ++j) s += v[j];
  const T mean = s / T(n);
  T q = T(0);
  for (int64_t j = 0; j < n; ++j) q += (v[j] - mean) * (v[j] - mean);
  const T r = T(1) / std::sqrt(q / T(n) + T(kLnEps));
  for (int64_t j = 0; j < n; ++j) y[j] = (v[j] - mean) * r;
  return r;
}

template <typename T>
void lnlstm_row_forward(int64_t H, T* __restrict a, const T* __restrict p,
                        const T* __restrict ex, const T* __restrict hp, const T* __restrict cp,
                        const T* __restrict cm, const T* __restrict km,
                        const T* __restrict zh, const T* __restrict zc, T* __restrict c,
                        T* __restrict h, T* __restrict ct, T* __restrict sv) {
  const int64_t G4 = 4 * H;
  const T *b = ex, *gx = ex + G4, *gh = ex + 2 * G4, *gc = ex + 3 * G4, *bc = gc + H;
  T *xn = sv, *hn = sv + G4, *cn = sv + 2 * G4, *r = cn + H;
  r[0] = ln_normalise<T>(G4, a, xn);
  r[1] = ln_normalise<T>(G4, p, hn);
  for (int64_t k = 0; k < G4; ++k) a[k] = gx[k] * xn[k] + gh[k] * hn[k] + b[k];
  T *ai = a, *af = a + H, *ag = a + 2 * H, *ao = a + 3 * H;
  for (int64_t j = 0; j < H; ++j) {
    ai[j] = fsigmoid(ai[j]);
    af[j] = fsigmoid(af[j]);
    ag[j] = ftanh(ag[j]);
    ao[j] = fsigmoid(ao[j]);
    ct[j] = (af[j] * cp[j] + ai[j] * (ag[j] * cm[j])) * km[j];
  }
  r[2] = ln_normalise<T>(H, ct, cn);
  for (int64_t j = 0; j < H; ++j) {
    T hn_j = ao[j] * ftanh(gc[j] * cn[j] + bc[j]);
    c[j] = zc[j] * cp[j] + (T(1) - zc[j]) * ct[j];
    h[j] = zh[j] * hp[j] + (T(1) - zh[j]) * hn_j;
  }
}

// In: dh = total dL/dh_t, dc = dL/dc_t. Out: gx = dL/d(xp), gh = dL/d(hp) (through their
// LNs), gate block k at gx + k * gxs (gh + k * ghs); dex (14H, this batch row's) += this
// step's gradients of b, gx, gh, gc, bc; dc = dL/dc_{t-1}; dh = zoneout's carry into
// h_{t-1}. gh's first block holds dL/dc^ until the end, gx dL/da until its LN backward.
// MG: also dL/d(candidate mask), dL/d(cell mask), dL/dz_h, dL/dz_c of this step into dcm,
// dkm, dzh, dzc.
template <typename T, bool MG>
void lnlstm_row_backward(int64_t H, const T* __restrict a, const T* __restrict sv,
                         const T* __restrict ex, const T* __restrict hp,
                         const T* __restrict cp, const T* __restrict ctp,
                         const T* __restrict cm, const T* __restrict km,
                         const T* __restrict zh, const T* __restrict zc, T* __restrict dh,
                         T* __restrict dc, T* __restrict gx, int64_t gxs, T* __restrict gh,
                         int64_t ghs, T* __restrict dex, T* __restrict dcm, T* __restrict dkm,
                         T* __restrict dzh, T* __restrict dzc) {
  const int64_t G4 = 4 * H;
  const T *gxp = ex + G4, *ghp = ex + 2 * G4, *gc = ex + 3 * G4, *bc = gc + H;
  const T *xn = sv, *hn = sv + G4, *cn = sv + 2 * G4, *r = cn + H;
  T *db = dex, *dgx = dex + G4, *dgh = dex + 2 * G4, *dgc = dex + 3 * G4, *dbc = dgc + H;
  const T *ai = a, *af = a + H, *ag = a + 2 * H, *ao = a + 3 * H;
  T* dcn = gh;  // scratch: dL/dc^
  T m1 = T(0), m2 = T(0);
  for (int64_t j = 0; j < H; ++j) {
    T tn = ftanh(gc[j] * cn[j] + bc[j]);
    T dn = dh[j] * (T(1) - zh[j]) * ao[j] * (T(1) - tn * tn);
    dgc[j] += dn * cn[j];
    dbc[j] += dn;
    dcn[j] = dn * gc[j];
    m1 += dcn[j];
    m2 += dcn[j] * cn[j];
  }
  m1 /= T(H);
  m2 /= T(H);
  for (int64_t j = 0; j < H; ++j) {
    T d = dh[j];
    T dht = d * (T(1) - zh[j]);
    T tn = ftanh(gc[j] * cn[j] + bc[j]);
    T i = ai[j], f = af[j], g = ag[j], o = ao[j];
    T dck = r[2] * (dcn[j] - m1 - cn[j] * m2) + dc[j] * (T(1) - zc[j]);  // dL/dc~_t
    T dct = dck * km[j];  // dL/d(f * c_{t-1} + i * g * m^c)
    gx[j] = dct * (g * cm[j]) * i * (T(1) - i);
    gx[gxs + j] = dct * cp[j] * f * (T(1) - f);
    gx[2 * gxs + j] = dct * i * cm[j] * (T(1) - g * g);
    gx[3 * gxs + j] = dht * tn * o * (T(1) - o);
    if constexpr (MG) {
      dcm[j] = dct * i * g;
      dkm[j] = dck * (f * cp[j] + i * (g * cm[j]));
      dzh[j] = d * (hp[j] - o * tn);
      dzc[j] = dc[j] * (cp[j] - ctp[j]);
    }
    dc[j] = dct * f + dc[j] * zc[j];
    dh[j] = d * zh[j];
  }
  T x1 = T(0), x2 = T(0), h1 = T(0), h2 = T(0);
  for (int64_t q = 0; q < 4; ++q) {  // gx holds dL/da: the gates' pre-activations
    const T* da = gx + q * gxs;
    for (int64_t j = 0, k = q * H; j < H; ++j, ++k) {
      db[k] += da[j];
      dgx[k] += da[j] * xn[k];
      dgh[k] += da[j] * hn[k];
      x1 += da[j] * gxp[k];
      x2 += da[j] * gxp[k] * xn[k];
      h1 += da[j] * ghp[k];
      h2 += da[j] * ghp[k] * hn[k];
    }
  }
  x1 /= T(G4);
  x2 /= T(G4);
  h1 /= T(G4);
  h2 /= T(G4);
  for (int64_t q = 0; q < 4; ++q) {
    T* gxq = gx + q * gxs;
    T* ghq = gh + q * ghs;
    for (int64_t j = 0, k = q * H; j < H; ++j, ++k) {
      T da = gxq[j];
      ghq[j] = r[1] * (da * ghp[k] - h1 - hn[k] * h2);
      gxq[j] = r[0] * (da * gxp[k] - x1 - xn[k] * x2);
    }
  }
}

// The LayerNorm LSTM to the layer loop: the recurrent product stays in its own buffer (LN
// normalises it apart from the input projection; b_x and b_h are None: the bias is in ex),
// the state is (h, c), and each step saves 9H + 3 values per batch row.
struct LayerNormLstmCell {
  static constexpr const char* kName = "layernorm_lstm";
  static constexpr int64_t G = 4;
  static constexpr bool kHasC = true;
  static constexpr bool kSplitRec = true;
  static constexpr bool kAux = false;
  static int64_t saved_width(int64_t H) { return 9 * H + 3; }
  static constexpr unsigned kStepMasks = step_mask::bits(
      step_mask::candidate, step_mask::cell, step_mask::zoneout_h, step_mask::zoneout_c);

  template <typename T, bool MASKED>
  static void forward(int64_t H, const FwdRow<T>& r) {
    using namespace step_mask;
    lnlstm_row_forward<T>(H, r.a, r.p, r.ex, r.hp, r.cp, r.m[candidate], r.m[cell],
                          r.m[zoneout_h], r.m[zoneout_c], r.c, r.h, r.ct, r.sv);
  }

  template <typename T, bool MG>
  static void backward(int64_t H, const BwdRow<T>& r) {
    using namespace step_mask;
    lnlstm_row_backward<T, MG>(H, r.a, r.sv, r.ex, r.hp, r.cp, r.ct, r.m[candidate],
                               r.m[cell], r.m[zoneout_h], r.m[zoneout_c], r.dh, r.dc, r.gx,
                               r.gxs, r.gh, r.ghs, r.dex, r.dm[candidate], r.dm[cell],
                               r.dm[zoneout_h], r.dm[zoneout_c]);
  }
};
