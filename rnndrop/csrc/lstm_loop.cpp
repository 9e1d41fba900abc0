// rnndrop: one LSTM layer (one direction) for the schemes the fused kernel cannot
// run: per-sample recurrent masks, candidate dropout, zoneout.
//
// One call does the input projection for all steps, the time loop with one fused
// elementwise pass per step, and (backward) backprop through time plus every weight
// gradient as one GEMM over all T*B rows. The math mirrors rnndrop/nn/cells.py
// (_step_forward / _step_backward) line for line; the tests compare the two.
//
// GEMMs go to oneDNN when libtorch exports it (as nn.LSTM does on CPU: on AVX-512
// machines whose MKL takes its AVX2 path, oneDNN is 2-3x faster), else to ATen.
//
// Layouts (all contiguous):
//   x         (T, B, I)     layer input, or (T, B, 4H) input projection if w_ih is None
//   w_ih      (4H, I), bias (4H) (b_ih + b_hh), w_hh (4H, H); gates i f g o
//   in_mask   (4, Tm, B, I) per-gate input masks (untied), or None
//   rec_mask  (Tm, G, B, H) mask on h_{t-1}, G = 1 (tied) or 4 (one per gate)
//   cand_mask (Tm, B, H)    mask on tanh(g)
//   zone_h/c  (Tz, B, H)    weight of the previous value (0/1 train, z eval, 1 padded)
// Tm and Tz are 1 (shared over time) or T.

#include <torch/extension.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

namespace at::native {
// Exported by libtorch_cpu (no public header); weak, so a build without it still loads.
__attribute__((weak)) void mkldnn_matmul(const at::Tensor& mat1, const at::Tensor& mat2,
                                         const at::Tensor& result, float beta, float alpha);
}  // namespace at::native

namespace {

using at::Tensor;
using OptT = c10::optional<Tensor>;

// ---- GEMM ---------------------------------------------------------------------

std::atomic<bool> g_onednn{true};

bool onednn_usable() {
  static const bool allowed = [] {
    const char* e = std::getenv("RNNDROP_GEMM");
    return !(e && std::strcmp(e, "aten") == 0);
  }();
  return allowed && g_onednn.load() && &at::native::mkldnn_matmul != nullptr;
}

// out = beta * out + a @ b  (2-D, or 3-D batched; out may be a strided view)
void gemm(const Tensor& a, const Tensor& b, Tensor out, float beta) {
  if (a.scalar_type() == at::kFloat && onednn_usable()) {
    try {
      at::native::mkldnn_matmul(a, b, out, beta, 1.0f);
      return;
    } catch (const c10::Error&) {
      g_onednn.store(false);  // unsupported here: use ATen from now on
    }
  }
  if (a.dim() == 3) {  // batched over gates; out may be a strided view
    if (beta == 0.0f) {
      out.copy_(at::bmm(a, b));
    } else {
      out.baddbmm_(a, b, beta, 1.0);
    }
  } else if (beta == 0.0f) {
    at::mm_out(out, a, b);
  } else {
    out.addmm_(a, b, beta, 1.0);
  }
}

// ---- elementwise math ------------------------------------------------------------
// float: branch-free approximations gcc vectorises (Cephes expf, ~1 ulp).
// double: libm, so float64 gradchecks see the exact functions.

inline float bits_to_float(int32_t i) {
  float f;
  std::memcpy(&f, &i, sizeof f);
  return f;
}

inline float fexp(float x) {
  x = x < -87.3f ? -87.3f : x;  // written so that NaN passes through
  x = x > 88.7f ? 88.7f : x;
  const float magic = 12582912.0f;  // 1.5 * 2^23: round to nearest integer
  float n = (x * 1.44269504088896341f + magic) - magic;
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  return p * bits_to_float((static_cast<int32_t>(n) + 127) << 23);
}

inline float fsigmoid(float x) { return 1.0f / (1.0f + fexp(-x)); }

inline float ftanh(float x) {
  float ax = std::fabs(x);
  float e = fexp(-2.0f * ax);
  float big = (1.0f - e) / (1.0f + e);
  float x2 = ax * ax;  // odd Taylor series near 0, where 1 - e cancels
  float small = ax * (1.0f + x2 * (-0.333333333f + x2 * (0.133333333f + x2 * -0.0539682540f)));
  return std::copysign(ax < 0.0625f ? small : big, x);
}

inline double fsigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }
inline double ftanh(double x) { return std::tanh(x); }

template <typename T>
inline const T* ptr(const Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

inline bool has(const OptT& t) { return t.has_value() && t->defined(); }

inline Tensor at_step(const OptT& m, int64_t t) {
  if (!has(m)) return Tensor();
  return m->size(0) == 1 ? (*m)[0] : (*m)[t];
}

// ---- one step -------------------------------------------------------------------
// Kernels over one batch row of H units. They take every pointer __restrict and
// have no branches in the loop body, so gcc vectorises them; an absent mask is
// passed as a row of ones (candidate, recurrent) or zeros (zoneout).

template <typename T>
void row_forward(int64_t H, T* __restrict ai, T* __restrict af, T* __restrict ag,
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
void row_forward_masked(int64_t H, T* __restrict ai, T* __restrict af, T* __restrict ag,
                        T* __restrict ao, const T* __restrict bias, const T* __restrict cp,
                        const T* __restrict hp, const T* __restrict cm, const T* __restrict zh,
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
    T cn = f * cp[j] + i * (g * cm[j]);
    T hn = o * ftanh(cn);
    ct[j] = cn;
    c[j] = zc[j] * cp[j] + (T(1) - zc[j]) * cn;
    h[j] = zh[j] * hp[j] + (T(1) - zh[j]) * hn;
  }
}

// d += a * m  (dL/dh_t collects the recurrent gradient of each gate group)
template <typename T>
void row_axpy(int64_t H, T* __restrict d, const T* __restrict a, const T* __restrict m) {
  for (int64_t j = 0; j < H; ++j) d[j] += a[j] * m[j];
}

// In: dh = total dL/dh_t, dc = dL/dc_t. Out: dgates; dc = dL/dc_{t-1} (cell path);
// dh = zoneout carry into h_{t-1}.
template <typename T>
void row_backward(int64_t H, const T* __restrict ai, const T* __restrict af,
                  const T* __restrict ag, const T* __restrict ao, const T* __restrict cp,
                  const T* __restrict ctp, const T* __restrict cm, const T* __restrict zh,
                  const T* __restrict zc, T* __restrict dh, T* __restrict dc,
                  T* __restrict gi, T* __restrict gf, T* __restrict gg, T* __restrict go) {
  for (int64_t j = 0; j < H; ++j) {
    T d = dh[j];
    T dc_in = dc[j];
    T dht = d * (T(1) - zh[j]);
    T tc = ftanh(ctp[j]);
    T i = ai[j], f = af[j], g = ag[j], o = ao[j];
    T dcn = dc_in * (T(1) - zc[j]) + dht * o * (T(1) - tc * tc);
    gi[j] = dcn * (g * cm[j]) * i * (T(1) - i);
    gf[j] = dcn * cp[j] * f * (T(1) - f);
    gg[j] = dcn * i * cm[j] * (T(1) - g * g);
    go[j] = dht * tc * o * (T(1) - o);
    dc[j] = dcn * f + dc_in * zc[j];
    dh[j] = d * zh[j];
  }
}

// Per-call constant rows standing in for absent masks.
template <typename T>
struct Rows {
  std::vector<T> ones, zeros;
  explicit Rows(int64_t n) : ones(n, T(1)), zeros(n, T(0)) {}
};

// A mask (steps, B, H) for step t, or a stand-in row repeated for every batch row.
template <typename T>
struct MaskAt {
  const T* base = nullptr;  // null: use the stand-in
  int64_t step_stride = 0;  // 0 when the mask is shared over time
  const T* fill = nullptr;
  const T* row(int64_t t, int64_t b, int64_t H) const {
    return base ? base + t * step_stride + b * H : fill;
  }
};

template <typename T>
MaskAt<T> mask_at(const OptT& m, const T* fill) {
  MaskAt<T> r;
  r.fill = fill;
  if (has(m)) {
    r.base = m->data_ptr<T>();
    r.step_stride = m->size(0) == 1 ? 0 : m->stride(0);
  }
  return r;
}

// ---- the layer ---------------------------------------------------------------------

// acts (T, B, 4H) = x W_ih^T, or per gate (x * in_mask_k) W_ih_k^T for untied input masks.
template <typename T>
Tensor project(const Tensor& x, const Tensor& w_ih, const OptT& in_mask, int64_t H) {
  const int64_t T_ = x.size(0), B = x.size(1);
  auto acts = at::empty({T_, B, 4 * H}, x.options());
  auto a2 = acts.view({T_ * B, 4 * H});
  if (!has(in_mask)) {
    gemm(x.view({T_ * B, -1}), w_ih.t().contiguous(), a2, 0.0f);
    return acts;
  }
  for (int64_t k = 0; k < 4; ++k) {
    auto xm = (x * (*in_mask)[k]).view({T_ * B, -1});
    gemm(xm, w_ih.narrow(0, k * H, H).t().contiguous(), a2.narrow(1, k * H, H), 0.0f);
  }
  return acts;
}

// A (B, 4H) gate buffer seen as (4, B, H), gate-major, without a copy.
inline Tensor by_gate(const Tensor& g, int64_t H) {
  return g.view({g.size(0), 4, H}).permute({1, 0, 2});
}

template <typename T>
std::vector<Tensor> forward_impl(const Tensor& x, const OptT& w_ih, const OptT& bias,
                                 const OptT& in_mask, const Tensor& w_hh, const Tensor& h0,
                                 const Tensor& c0, const OptT& rec_mask, const OptT& cand_mask,
                                 const OptT& zone_h, const OptT& zone_c, bool reverse) {
  const int64_t T_ = x.size(0), B = x.size(1), H = w_hh.size(1), BH = B * H;
  const bool has_rec = has(rec_mask), has_zc = has(zone_c);
  const bool plain = !has(cand_mask) && !has(zone_h) && !has_zc;
  const int64_t G = has_rec ? rec_mask->size(1) : 1;
  Tensor acts = has(w_ih) ? project<T>(x, *w_ih, in_mask, H) : x.clone();
  auto h_seq = at::empty({T_, B, H}, x.options());
  auto c_seq = at::empty({T_, B, H}, x.options());
  auto ct_seq = has_zc ? at::empty({T_, B, H}, x.options()) : Tensor();
  // masked h_{t-1}, gate-major (G, T, B, H): per-gate blocks contiguous for dW_hh
  auto hm_seq = has_rec ? at::empty({G, T_, B, H}, x.options()) : Tensor();
  // W_hh^T (H, 4H) tied, or W_hh_k^T stacked (4, H, H) per gate: the layouts oneDNN runs fastest
  auto whh_t = G == 1 ? w_hh.t().contiguous()
                      : w_hh.view({4, H, H}).transpose(1, 2).contiguous();
  Rows<T> rows(4 * H);
  std::vector<T> scratch(H);
  const T* b_ptr = has(w_ih) && has(bias) ? bias->data_ptr<T>() : rows.zeros.data();
  const auto cm = mask_at<T>(cand_mask, rows.ones.data());
  const auto zh = mask_at<T>(zone_h, rows.zeros.data());
  const auto zc = mask_at<T>(zone_c, rows.zeros.data());
  const T* rm = has_rec ? rec_mask->data_ptr<T>() : nullptr;
  const int64_t rm_stride = has_rec && rec_mask->size(0) > 1 ? G * BH : 0;
  T* A = acts.data_ptr<T>();
  T* Hs = h_seq.data_ptr<T>();
  T* Cs = c_seq.data_ptr<T>();
  T* CTs = has_zc ? ct_seq.data_ptr<T>() : nullptr;
  T* HM = has_rec ? hm_seq.data_ptr<T>() : nullptr;
  for (int64_t s = 0; s < T_; ++s) {
    const int64_t t = reverse ? T_ - 1 - s : s;
    const int64_t tp = reverse ? t + 1 : t - 1;
    const T* hp = s == 0 ? h0.data_ptr<T>() : Hs + tp * BH;
    const T* cp = s == 0 ? c0.data_ptr<T>() : Cs + tp * BH;
    Tensor a = acts[t];
    if (has_rec) {  // hm_t = h_{t-1} * m_t, per gate group
      const T* m = rm + t * rm_stride;
      for (int64_t k = 0; k < G; ++k) {
        T* out = HM + (k * T_ + t) * BH;
        for (int64_t q = 0; q < BH; ++q) out[q] = hp[q] * m[k * BH + q];
      }
      Tensor hm = hm_seq.select(1, t);  // (G, B, H)
      if (G == 1) {
        gemm(hm[0], whh_t, a, 1.0f);
      } else {
        gemm(hm, whh_t, by_gate(a, H), 1.0f);  // one batched GEMM for the four gates
      }
    } else {
      gemm(s == 0 ? h0 : h_seq[tp], whh_t, a, 1.0f);
    }
    for (int64_t b = 0; b < B; ++b) {
      T* ab = A + (t * B + b) * 4 * H;
      const int64_t r = t * BH + b * H;
      if (plain) {
        row_forward<T>(H, ab, ab + H, ab + 2 * H, ab + 3 * H, b_ptr, cp + b * H, Cs + r, Hs + r);
      } else {
        row_forward_masked<T>(H, ab, ab + H, ab + 2 * H, ab + 3 * H, b_ptr, cp + b * H,
                              hp + b * H, cm.row(t, b, H), zh.row(t, b, H), zc.row(t, b, H),
                              Cs + r, Hs + r, CTs ? CTs + r : scratch.data());
      }
    }
  }
  return {h_seq, c_seq, acts, ct_seq, hm_seq};
}

// Returns {dgates, dh0, dc0, dw_hh, dx, dw_ih, dbias}; the last three only with w_ih.
template <typename T>
std::vector<Tensor> backward_impl(const OptT& dh_seq, const Tensor& dc_last, const Tensor& x,
                                  const OptT& w_ih, bool has_bias, const OptT& in_mask,
                                  const Tensor& w_hh, const Tensor& h0, const Tensor& c0,
                                  const Tensor& acts, const Tensor& h_seq, const Tensor& c_seq,
                                  const OptT& ct_seq, const OptT& hm_seq, const OptT& rec_mask,
                                  const OptT& cand_mask, const OptT& zone_h, const OptT& zone_c,
                                  bool reverse, bool need_x, bool need_w) {
  const int64_t T_ = acts.size(0), B = acts.size(1), H = w_hh.size(1), BH = B * H;
  const bool has_rec = has(rec_mask), has_zc = has(zone_c), has_out = has(dh_seq);
  const int64_t G = has_rec ? rec_mask->size(1) : 1;
  auto dgates = at::empty_like(acts);
  auto dh = at::zeros({B, H}, acts.options());  // carry, then total dL/dh_t
  auto dc = dc_last.clone();
  auto dh_rec = at::empty({G, B, H}, acts.options());
  auto w_gate = w_hh.view({4, H, H});  // W_hh_k, for the untied batched GEMM
  Rows<T> rows(H);
  const auto cm = mask_at<T>(cand_mask, rows.ones.data());
  const auto zh = mask_at<T>(zone_h, rows.zeros.data());
  const auto zc = mask_at<T>(zone_c, rows.zeros.data());
  const T* rm = has_rec ? rec_mask->data_ptr<T>() : nullptr;
  const int64_t rm_stride = has_rec && rec_mask->size(0) > 1 ? G * BH : 0;
  const T* A = acts.data_ptr<T>();
  const T* Cs = c_seq.data_ptr<T>();
  const T* CTs = has_zc ? ct_seq->data_ptr<T>() : Cs;
  const T* DO = has_out ? dh_seq->data_ptr<T>() : nullptr;
  T* DG = dgates.data_ptr<T>();
  T* DH = dh.data_ptr<T>();
  T* DC = dc.data_ptr<T>();
  const T* DR = dh_rec.data_ptr<T>();
  int64_t t_next = -1;  // the step processed just before (t+1 in time order)
  for (int64_t s = T_ - 1; s >= 0; --s) {
    const int64_t t = reverse ? T_ - 1 - s : s;
    const int64_t tp = reverse ? t + 1 : t - 1;
    const T* cp = s == 0 ? c0.data_ptr<T>() : Cs + tp * BH;
    for (int64_t b = 0; b < B; ++b) {
      const int64_t r = t * BH + b * H;
      T* d = DH + b * H;
      if (DO) row_axpy<T>(H, d, DO + r, rows.ones.data());
      for (int64_t k = 0; t_next >= 0 && k < G; ++k) {
        const T* m = has_rec ? rm + t_next * rm_stride + k * BH + b * H : rows.ones.data();
        row_axpy<T>(H, d, DR + k * BH + b * H, m);
      }
      const T* ab = A + (t * B + b) * 4 * H;
      T* gb = DG + (t * B + b) * 4 * H;
      row_backward<T>(H, ab, ab + H, ab + 2 * H, ab + 3 * H, cp + b * H, CTs + r,
                      cm.row(t, b, H), zh.row(t, b, H), zc.row(t, b, H), d, DC + b * H, gb,
                      gb + H, gb + 2 * H, gb + 3 * H);
    }
    Tensor g = dgates[t];  // dL/d(masked h_{t-1}) = dgates_t W_hh, per gate group
    if (G == 1) {
      gemm(g, w_hh, dh_rec[0], 0.0f);
    } else {
      gemm(by_gate(g, H), w_gate, dh_rec, 0.0f);
    }
    t_next = t;
  }
  for (int64_t k = 0; k < G; ++k) {  // the first step's recurrent input was h0
    for (int64_t b = 0; b < B; ++b) {
      const T* m = has_rec ? rm + t_next * rm_stride + k * BH + b * H : rows.ones.data();
      row_axpy<T>(H, DH + b * H, DR + k * BH + b * H, m);
    }
  }

  std::vector<Tensor> out{dgates, dh, dc, Tensor(), Tensor(), Tensor(), Tensor()};
  auto dg2 = dgates.view({T_ * B, 4 * H});
  if (need_w) {  // dW_hh = sum_t dgates_t^T (masked h_{t-1}): one GEMM per gate group
    auto dw = at::empty({4 * H, H}, acts.options());
    if (has_rec && G == 1) {
      gemm(dg2.t(), (*hm_seq)[0].view({T_ * B, H}), dw, 0.0f);
    } else if (has_rec) {  // (4, H, TB) @ (4, TB, H), batched over gates
      gemm(dg2.view({T_ * B, 4, H}).permute({1, 2, 0}), hm_seq->view({4, T_ * B, H}),
           dw.view({4, H, H}), 0.0f);
    } else {  // h_{t-1} is h_seq shifted by one step, h0 at the first step
      const int64_t first = reverse ? T_ - 1 : 0;
      auto rest = reverse ? dgates.narrow(0, 0, T_ - 1) : dgates.narrow(0, 1, T_ - 1);
      auto prev = reverse ? h_seq.narrow(0, 1, T_ - 1) : h_seq.narrow(0, 0, T_ - 1);
      gemm(dgates[first].t(), h0, dw, 0.0f);
      if (T_ > 1) {
        gemm(rest.reshape({(T_ - 1) * B, 4 * H}).t(), prev.reshape({(T_ - 1) * B, H}), dw,
             1.0f);
      }
    }
    out[3] = dw;
  }
  if (has(w_ih)) {
    if (need_x) out[4] = at::zeros_like(x);
    if (need_w) out[5] = at::empty_like(*w_ih);
    for (int64_t k = 0; k < (has(in_mask) ? 4 : 1); ++k) {
      // tied: one GEMM over all gates; untied: gate k sees x * in_mask_k
      auto dgk = has(in_mask) ? dg2.narrow(1, k * H, H) : dg2;
      auto wk = has(in_mask) ? w_ih->narrow(0, k * H, H) : *w_ih;
      if (need_x) {
        auto dxk = at::empty_like(x);
        gemm(dgk, wk, dxk.view({T_ * B, -1}), 0.0f);
        out[4].add_(has(in_mask) ? dxk * (*in_mask)[k] : dxk);
      }
      if (need_w) {
        auto xk = has(in_mask) ? (x * (*in_mask)[k]).contiguous() : x;
        auto dwk = has(in_mask) ? out[5].narrow(0, k * H, H) : out[5];
        gemm(dgk.t(), xk.view({T_ * B, -1}), dwk, 0.0f);
      }
    }
    if (need_w && has_bias) out[6] = dg2.sum(0);
  }
  return out;
}

std::vector<Tensor> layer_forward(const Tensor& x, const OptT& w_ih, const OptT& bias,
                                  const OptT& in_mask, const Tensor& w_hh, const Tensor& h0,
                                  const Tensor& c0, const OptT& rec_mask, const OptT& cand_mask,
                                  const OptT& zone_h, const OptT& zone_c, bool reverse) {
  TORCH_CHECK(x.is_contiguous() && w_hh.is_contiguous() && h0.is_contiguous() &&
                  c0.is_contiguous(),
              "rnndrop layer_forward: inputs must be contiguous");
  if (x.scalar_type() == at::kDouble) {
    return forward_impl<double>(x, w_ih, bias, in_mask, w_hh, h0, c0, rec_mask, cand_mask,
                                zone_h, zone_c, reverse);
  }
  TORCH_CHECK(x.scalar_type() == at::kFloat, "rnndrop layer_forward: float32/float64 only");
  return forward_impl<float>(x, w_ih, bias, in_mask, w_hh, h0, c0, rec_mask, cand_mask, zone_h,
                             zone_c, reverse);
}

std::vector<Tensor> layer_backward(const OptT& dh_seq, const Tensor& dc_last, const Tensor& x,
                                   const OptT& w_ih, bool has_bias, const OptT& in_mask,
                                   const Tensor& w_hh, const Tensor& h0, const Tensor& c0,
                                   const Tensor& acts, const Tensor& h_seq, const Tensor& c_seq,
                                   const OptT& ct_seq, const OptT& hm_seq, const OptT& rec_mask,
                                   const OptT& cand_mask, const OptT& zone_h, const OptT& zone_c,
                                   bool reverse, bool need_x, bool need_w) {
  if (acts.scalar_type() == at::kDouble) {
    return backward_impl<double>(dh_seq, dc_last, x, w_ih, has_bias, in_mask, w_hh, h0, c0, acts,
                                 h_seq, c_seq, ct_seq, hm_seq, rec_mask, cand_mask, zone_h,
                                 zone_c, reverse, need_x, need_w);
  }
  return backward_impl<float>(dh_seq, dc_last, x, w_ih, has_bias, in_mask, w_hh, h0, c0, acts,
                              h_seq, c_seq, ct_seq, hm_seq, rec_mask, cand_mask, zone_h, zone_c,
                              reverse, need_x, need_w);
}

// ---- dropout masks -------------------------------------------------------------
// SplitMix64 (Steele et al. 2014) as a counter-based generator: word w of a mask is
// mix(seed + (w + 1) * golden); element i compares the signed 16-bit slice (i % 4) of
// word i / 4 (little-endian) with `threshold`. rnndrop/functional.py computes the
// same bits with torch integer ops, so masks do not depend on this kernel.

inline uint64_t splitmix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

// MODE 0: out[i] = m_i; 1: out[i] = src[i] * m_i; 2: out[i] *= m_i (in place), with
// m_i = value or 0 as above. One instantiation per mode keeps every loop branch-free and
// its pointers unaliased, so gcc vectorises the mixing (a runtime branch here cost 50x).
template <typename T, int MODE>
void fill_mask(T* __restrict out, const T* __restrict src, int64_t n, uint64_t seed,
               int16_t threshold, T value) {
  auto put = [&](int64_t i, int16_t s) {
    const T m = s < threshold ? value : T(0);
    if constexpr (MODE == 0) out[i] = m;
    if constexpr (MODE == 1) out[i] = src[i] * m;
    if constexpr (MODE == 2) out[i] *= m;
  };
  const int64_t words = n / 4;
  for (int64_t w = 0; w < words; ++w) {
    uint64_t z = splitmix64(seed + static_cast<uint64_t>(w + 1) * 0x9E3779B97F4A7C15ULL);
    for (int k = 0; k < 4; ++k) {
      put(4 * w + k, static_cast<int16_t>(static_cast<uint16_t>(z >> (16 * k))));
    }
  }
  for (int64_t i = 4 * words; i < n; ++i) {
    uint64_t z = splitmix64(seed + static_cast<uint64_t>(i / 4 + 1) * 0x9E3779B97F4A7C15ULL);
    put(i, static_cast<int16_t>(static_cast<uint16_t>(z >> (16 * (i % 4)))));
  }
}

template <typename T>
void fill(Tensor& out, const Tensor* src, int64_t seed, int64_t threshold, double value) {
  T* o = out.data_ptr<T>();
  const auto sd = static_cast<uint64_t>(seed);
  const auto thr = static_cast<int16_t>(threshold);
  const auto v = static_cast<T>(value);
  if (src == nullptr) {
    fill_mask<T, 0>(o, nullptr, out.numel(), sd, thr, v);
  } else if (src->data_ptr<T>() == o) {
    fill_mask<T, 2>(o, nullptr, out.numel(), sd, thr, v);
  } else {
    fill_mask<T, 1>(o, src->data_ptr<T>(), out.numel(), sd, thr, v);
  }
}

Tensor bernoulli_mask(int64_t n, int64_t seed, int64_t threshold, double value, bool dbl) {
  auto out = at::empty({n}, at::TensorOptions().dtype(dbl ? at::kDouble : at::kFloat));
  if (dbl) {
    fill<double>(out, nullptr, seed, threshold, value);
  } else {
    fill<float>(out, nullptr, seed, threshold, value);
  }
  return out;
}

// out = src * mask(seed) without materialising the mask; out may be src (in place).
// Weight drop uses it forward and, with the same seed, backward.
void mask_mul(const Tensor& src, int64_t seed, int64_t threshold, double value, Tensor out) {
  TORCH_CHECK(src.is_contiguous() && out.is_contiguous() && src.numel() == out.numel(),
              "mask_mul: src and out must be contiguous and of the same size");
  TORCH_CHECK(src.scalar_type() == out.scalar_type(), "mask_mul: dtype mismatch");
  if (src.scalar_type() == at::kDouble) {
    fill<double>(out, &src, seed, threshold, value);
  } else {
    TORCH_CHECK(src.scalar_type() == at::kFloat, "mask_mul: float32 or float64 only");
    fill<float>(out, &src, seed, threshold, value);
  }
}

bool uses_onednn() { return onednn_usable(); }

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &layer_forward, "LSTM layer with the time loop, forward");
  m.def("backward", &layer_backward, "LSTM layer with the time loop, backward");
  m.def("uses_onednn", &uses_onednn, "True if GEMMs run in oneDNN");
  m.def("bernoulli_mask", &bernoulli_mask, "SplitMix64 dropout mask (see functional.py)");
  m.def("mask_mul", &mask_mul, "out = src * SplitMix64 dropout mask, mask never stored");
}
