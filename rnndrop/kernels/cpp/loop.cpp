// rnndrop: one recurrent layer (one direction) for the schemes the fused kernels cannot
// run: per-sample recurrent masks, candidate and cell dropout, zoneout.
//
// One call does the input projection for all steps, the time loop with one fused
// elementwise pass per step, and (backward) backprop through time plus every weight
// gradient as one GEMM over all T*B rows. The loop is written once (forward_impl,
// backward_impl) and templated on a cell's traits: its gate count, state and pointwise row
// kernels (cell_lstm.h, cell_gru.h, cell_rnn.h; "cells" below says what a cell provides).
// It mirrors the python backend (rnndrop/kernels/python.py) and the cells' step_forward /
// step_backward (rnndrop/nn/cells/*.py) line for line; the tests compare them.
//
// GEMMs go to oneDNN when libtorch exports it (as nn.LSTM does on CPU: on AVX-512
// machines whose MKL takes its AVX2 path, oneDNN is 2-3x faster), else to ATen.
//
// Layouts (all contiguous). G gates: 4 for the LSTM (i f g o), 3 for the GRU (r z n), 1 for
// the Elman RNN.
// Arguments and results follow rnndrop/kernels/contract.py (LayerInputs, Saved, Grads).
//   x         (T, B, I)       layer input, or (T, B, GH) input projection (bias included)
//                             if w_ih is None
//   w_ih      (GH, I), w_hh (GH, H)
//   b_x       (GH)            added to the input projection (LSTM b_ih + b_hh, GRU b_ih)
//   b_h       (GH)            GRU: b_hh, added to the recurrent product h W_hh^T, so that
//                             n = tanh(xp_n + r * (W_hn h + b_hn))
//   in_mask   (G, Tm, B|1, I) per-gate input masks (untied), or None
//   rec_mask  (Tm, Gr, B, H)  mask on h_{t-1} where it enters W_hh, Gr = 1 (tied) or G
//   steps     [Tm|Tz, B, H]   the step masks, LayerMasks' "step" fields as one list in their
//                             order (step_masks.h, generated from LayerMasks; None where
//                             absent): candidate (LSTM tanh(g), GRU n), cell (the new cell
//                             state c~), zoneout_h/c (weight of the previous value: 0/1 train,
//                             z eval, 1 padded)
// Tm and Tz are 1 (shared over time) or T. Saved by forward for backward:
//   acts      (T, B, GH)      gate activations (the candidate before its mask)
//   h_seq, c_seq (T, B, H)    h_t, and the LSTM's c_t
//   ct_seq    (T, B, H)       LSTM c_t before zoneout (only with zoneout_c)
//   hm_seq    (Gr, T, B, H)   masked h_{t-1}, gate-group-major (only with rec_mask)
//   hn_seq    (T, B, H)       GRU W_hn (h_{t-1} * m_n) + b_hn
// Backward with need_masks (concrete dropout learns the rates) also returns the gradients of
// the masks applied inside the loop, per step (the adapter sums them to the masks' shapes):
// recurrent (T, Gr, B, H) dL/dm = dL/d(masked h_{t-1}) * h_{t-1}; candidate (T, B, H)
// dL/dm = dL/du * i * g (LSTM, u = f * c_{t-1} + i * g * m), dL/dh~ * (1 - z) * n (GRU);
// cell (T, B, H) dL/dm = dL/dc~ * u; zoneout dL/dz_h =
// dL/dh_t * (h_{t-1} - h~_t), dL/dz_c = dL/dc_t * (c_{t-1} - c~_t); the step masks' come back
// as one list in their order. The untied input masks' gradient comes from dgates outside
// (python.py).

#include <ATen/Parallel.h>
#include <torch/extension.h>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

namespace at::native {
// Exported by libtorch_cpu (no public header); weak, so a build without it still loads.
__attribute__((weak)) void mkldnn_matmul(const at::Tensor& mat1, const at::Tensor& mat2,
                                         const at::Tensor& result, float beta, float alpha);
}  // namespace at::native

namespace {

using at::Tensor;
using OptT = c10::optional<Tensor>;

// ---- subnormals ----------------------------------------------------------------------
// Gradients that vanish through hundreds of steps pass through the subnormal range
// (< 1.2e-38 in float32), and Intel cores pay a microcode assist for every subnormal
// operand: measured 1.7x on a whole BPTT (docs/engine.md). Flush-to-zero (results) and
// denormals-are-zero (operands) remove it; they change only values below the smallest normal
// float. The mode is per thread (MXCSR on x86, FPCR on aarch64) and ATen's OpenMP workers do
// not inherit the caller's (measured: torch.set_flush_denormal leaves the half of an
// elementwise op that a worker computes unflushed), so it is set on every intra-op thread.

#if defined(__x86_64__) || defined(_M_X64)
using FpMode = unsigned;
constexpr FpMode kFlushBits = 0x8040;  // MXCSR FTZ (bit 15) | DAZ (bit 6)
inline FpMode fp_mode() { return _mm_getcsr(); }
inline void set_fp_mode(FpMode m) { _mm_setcsr(m); }
constexpr bool kCanFlush = true;
#elif defined(__aarch64__)
using FpMode = uint64_t;
constexpr FpMode kFlushBits = FpMode(1) << 24;  // FPCR.FZ (inputs and results)
inline FpMode fp_mode() {
  FpMode v;
  asm volatile("mrs %0, fpcr" : "=r"(v));
  return v;
}
inline void set_fp_mode(FpMode v) { asm volatile("msr fpcr, %0" ::"r"(v)); }
constexpr bool kCanFlush = true;
#else
using FpMode = unsigned;
constexpr FpMode kFlushBits = 0;
inline FpMode fp_mode() { return 0; }
inline void set_fp_mode(FpMode) {}
constexpr bool kCanFlush = false;
#endif

inline void set_flush_here(bool on) {
  FpMode m = fp_mode();
  set_fp_mode(on ? (m | kFlushBits) : (m & ~kFlushBits));
}

// The calling thread and every thread of ATen's intra-op pool (the OpenMP team that oneDNN
// and MKL share): with a range of n threads and grain 1, thread i runs chunk i. Returns false
// where the CPU has no such mode.
bool set_flush(bool on) {
  if (!kCanFlush) return false;
  set_flush_here(on);
  const int64_t n = at::get_num_threads();
  if (n > 1 && !at::in_parallel_region()) {
    at::parallel_for(0, n, 1, [on](int64_t, int64_t) { set_flush_here(on); });
  }
  return true;
}

bool flushing() { return kCanFlush && (fp_mode() & kFlushBits) == kFlushBits; }

// The loop flushes for the duration of each call unless rnndrop.set_flush_subnormals(False).
std::atomic<bool> g_loop_flush{true};

// Flush inside one forward or backward call and restore the caller's mode after; a caller
// already flushing (rnndrop.set_flush_subnormals(True)) is left as it is.
struct FlushScope {
  bool active = false;
  FlushScope() {
    if (g_loop_flush.load(std::memory_order_relaxed) && kCanFlush && !flushing()) {
      active = set_flush(true);
    }
  }
  ~FlushScope() {
    if (active) set_flush(false);
  }
  FlushScope(const FlushScope&) = delete;
  FlushScope& operator=(const FlushScope&) = delete;
};

void set_loop_flush(bool on) { g_loop_flush.store(on); }

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

inline bool has(const OptT& t) { return t.has_value() && t->defined(); }

// ---- masks -------------------------------------------------------------------------

// Per-call constant rows standing in for absent masks and biases.
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

// The recurrent mask (Tm, Gr, B, H): row b of gate group k at step t, or ones if absent.
template <typename T>
struct RecMask {
  const T* base = nullptr;  // null: no recurrent mask
  int64_t step_stride = 0;  // 0 when the mask is shared over time
  int64_t groups = 1;       // Gr
  int64_t BH = 0;
  const T* ones = nullptr;
  const T* step(int64_t t) const { return base + t * step_stride; }  // (Gr, B, H)
  const T* row(int64_t t, int64_t k, int64_t b, int64_t H) const {
    return base ? step(t) + k * BH + b * H : ones;
  }
};

template <typename T>
RecMask<T> rec_mask_at(const OptT& m, const T* ones) {
  RecMask<T> r;
  r.ones = ones;
  if (has(m)) {
    r.base = m->data_ptr<T>();
    r.groups = m->size(1);
    r.BH = m->size(2) * m->size(3);
    r.step_stride = m->size(0) == 1 ? 0 : m->stride(0);
  }
  return r;
}

#include "step_masks.h"

// The step masks of one call (step_masks.h), one MaskAt each; an absent one reads its
// stand-in row (ones or zeros, step_mask::kAbsent). A mask the cell does not read (`reads`,
// its kStepMasks bits) counts as absent: it is neither applied nor given a gradient.
template <typename T>
struct StepMasks {
  std::array<MaskAt<T>, step_mask::kCount> at;
  std::array<bool, step_mask::kCount> present{};
  bool any = false;  // the MASKED / plain switch: some mask the cell reads is present
  StepMasks(const std::vector<OptT>& m, unsigned reads, const Rows<T>& rows) {
    for (int k = 0; k < step_mask::kCount; ++k) {
      present[k] = ((reads >> k) & 1u) && has(m[k]);
      const T* fill = step_mask::kAbsent[k] ? rows.ones.data() : rows.zeros.data();
      at[k] = mask_at<T>(present[k] ? m[k] : OptT(), fill);
      any = any || present[k];
    }
  }
  // step t, batch row b: every mask's row (what FwdRow / BwdRow carry)
  void rows(int64_t t, int64_t b, int64_t H, std::array<const T*, step_mask::kCount>& out) const {
    for (int k = 0; k < step_mask::kCount; ++k) out[k] = at[k].row(t, b, H);
  }
};

// ---- shared by the cells -------------------------------------------------------------

// A buffer that lives only inside one forward or backward call, kept per thread and slot
// between calls: the untied path's scratch is tens of MB at long sequences, and glibc returns
// blocks that large to the kernel on free, so every call page-faulted them in again (measured
// ~0.1x of nn.LSTM on an untied T = 500 BPTT without rnndrop.runtime.tune_allocator). At most
// 64 MB a slot is kept, so a huge layer does not pin its scratch for the life of the thread.
enum Scratch { kMaskedInput, kInputGrad, kGateMajorX, kGateMajorH, kSlots };
inline Tensor scratch(Scratch slot, at::IntArrayRef sizes, const at::TensorOptions& o) {
  thread_local std::array<Tensor, kSlots> cache;
  int64_t n = 1;
  for (auto s : sizes) n *= s;
  constexpr int64_t kMaxKeptBytes = int64_t(64) << 20;  // larger ones are not kept
  if (n * static_cast<int64_t>(o.dtype().itemsize()) > kMaxKeptBytes) return at::empty(sizes, o);
  Tensor& c = cache[slot];
  if (!c.defined() || c.numel() < n || c.scalar_type() != o.dtype().toScalarType()) {
    c = Tensor();  // free the old one first
    c = at::empty({n}, o);
  }
  return c.narrow(0, 0, n).view(sizes);
}

// acts (T, B, GH) = x W_ih^T, or per gate (x * in_mask_k) W_ih_k^T for untied input masks.
template <typename T>
Tensor project(const Tensor& x, const Tensor& w_ih, const OptT& in_mask, int64_t H, int64_t G) {
  const int64_t T_ = x.size(0), B = x.size(1);
  auto acts = at::empty({T_, B, G * H}, x.options());
  auto a2 = acts.view({T_ * B, G * H});
  if (!has(in_mask)) {
    gemm(x.view({T_ * B, -1}), w_ih.t().contiguous(), a2, 0.0f);
    return acts;
  }
  auto xm = scratch(kMaskedInput, x.sizes(), x.options());  // every gate's masked input
  for (int64_t k = 0; k < G; ++k) {
    at::mul_out(xm, x, (*in_mask)[k]);
    gemm(xm.view({T_ * B, -1}), w_ih.narrow(0, k * H, H).t().contiguous(),
         a2.narrow(1, k * H, H), 0.0f);
  }
  return acts;
}

// W_hh as the forward GEMM takes it: W_hh^T (H, GH) with Gr = 1, else W_hh_k^T stacked
// (G, H, H) per gate: the layouts oneDNN runs fastest.
inline Tensor whh_forward(const Tensor& w_hh, int64_t Gr, int64_t G) {
  const int64_t H = w_hh.size(1);
  return Gr == 1 ? w_hh.t().contiguous() : w_hh.view({G, H, H}).transpose(1, 2).contiguous();
}

// Row b of h_{t-1} (at hp) times step t's recurrent mask, into hm_seq[:, t] (backward's
// dW_hh reuses it) and, untied, into the dense (G, B, H) scratch the batched GEMM reads
// (ATen hands oneDNN a batched operand whose batch stride is not its block size only after a
// copy). The forward loop runs it for h_t's rows right after the cell computed them.
template <typename T>
inline void mask_rec_row(const RecMask<T>& rm, int64_t t, int64_t b, int64_t H, const T* hp,
                         T* HM, int64_t T_, T* HS) {
  const int64_t BH = rm.BH;
  for (int64_t k = 0; k < rm.groups; ++k) {
    T* __restrict o = HM + (k * T_ + t) * BH + b * H;
    const T* __restrict mk = rm.row(t, k, b, H);
    const T* __restrict h = hp;
    for (int64_t j = 0; j < H; ++j) o[j] = h[j] * mk[j];
    if (HS) std::memcpy(HS + k * BH + b * H, o, H * sizeof(T));
  }
}

// out (B, GH) = beta * out + (h_{t-1} * m_t) W_hh^T; h_{t-1} is h0 (tp < 0) or h_seq[tp].
// With a recurrent mask the masked h_{t-1} is already in hm_seq[:, t] (mask_rec_row). Untied,
// the batched GEMM reads it from the dense (G, B, H) scratch per_gate[1] and writes its product
// to per_gate[0]; the caller adds that into the gate rows (per_gate_row, split over rows with
// the cell's math): a GEMM into the strided per-gate view of out costs a copy each way.
template <typename T>
void recurrent_product(const Tensor& h0, const Tensor& h_seq, int64_t tp, const RecMask<T>& rm,
                       const Tensor& hm_seq, int64_t t, const Tensor& whh, const Tensor& out,
                       float beta, const std::array<Tensor, 2>& per_gate) {
  if (!rm.base) {
    gemm(tp < 0 ? h0 : h_seq[tp], whh, out, beta);
  } else if (rm.groups == 1) {
    gemm(hm_seq.select(1, t)[0], whh, out, beta);
  } else {
    gemm(per_gate[1], whh, per_gate[0], 0.0f);
  }
}

// Row b (G blocks of H at a) += (ADD) or = the untied recurrent product (G, B, H) at p.
template <bool ADD, typename T>
inline void per_gate_row(int64_t G, int64_t H, int64_t BH, int64_t b, T* __restrict a,
                         const T* __restrict p) {
  for (int64_t k = 0; k < G; ++k) {
    T* __restrict o = a + k * H;
    const T* __restrict q = p + k * BH + b * H;
    for (int64_t j = 0; j < H; ++j) o[j] = ADD ? o[j] + q[j] : q[j];
  }
}

// d += a * m  (dL/dh_t collects the recurrent gradient of each gate group)
template <typename T>
void row_axpy(int64_t H, T* __restrict d, const T* __restrict a, const T* __restrict m) {
  for (int64_t j = 0; j < H; ++j) d[j] += a[j] * m[j];
}

// Row b of d += dL/dh_t from the output (dout, may be null) and, through W_hh, from the
// step processed before (t_next; < 0 at the first): dr (Gr, B, H) times that step's mask.
template <typename T>
inline void gather_dh(int64_t H, int64_t BH, int64_t b, T* d, const T* dout, const T* dr,
                      const RecMask<T>& rm, int64_t t_next) {
  if (dout) row_axpy<T>(H, d, dout, rm.ones);
  for (int64_t k = 0; t_next >= 0 && k < rm.groups; ++k) {
    row_axpy<T>(H, d, dr + k * BH + b * H, rm.row(t_next, k, b, H));
  }
}

// dr (Gr, B, H) = dL/d(masked h_{t-1}) = dg_t W_hh per gate group; dg_t is (B, GH) when
// tied, (G, B, H) when untied (Dgates::row_to_dense); w_gate = W_hh viewed (G, H, H).
inline void recurrent_grad(const Tensor& dg_t, const Tensor& w_hh, const Tensor& w_gate,
                           const Tensor& dr) {
  if (dr.size(0) == 1) {
    gemm(dg_t, w_hh, dr[0], 0.0f);
  } else {
    gemm(dg_t, w_gate, dr, 0.0f);
  }
}

// drm[t] (Gr, B, H) = dr * h_{t-1}: the recurrent mask's gradient at step t (concrete
// dropout), from dr = dL/d(masked h_{t-1}) of that step.
template <typename T>
void rec_mask_grad(const Tensor& dr, const T* hp, const Tensor& drm, int64_t t) {
  const int64_t Gr = dr.size(0), BH = dr.size(1) * dr.size(2);
  const T* d = dr.data_ptr<T>();
  T* o = drm.data_ptr<T>() + t * Gr * BH;
  for (int64_t k = 0; k < Gr; ++k) {
    for (int64_t q = 0; q < BH; ++q) o[k * BH + q] = d[k * BH + q] * hp[q];
  }
}

// dL/d(gates) of a whole sequence in one of two layouts. Step-major (T, B, GH) is what the
// tied GEMMs read. Gate-major (G, T, B, H) is what the untied (per-gate) GEMMs read: a gate's
// block of a step-major buffer is a strided view (row stride GH) that oneDNN copies, with a
// transposition, before each GEMM that reads it (measured: 30% of an untied T = 500 BPTT,
// plus two ATen copies per step). With untied recurrent masks the row kernels write
// gate-major directly (BwdRow's gate stride), so neither the per-step recurrent GEMM nor the
// weight gradients copy anything.
struct Dgates {
  Tensor buf;  // (T, B, GH) or (G, T, B, H)
  bool gm = false;
  int64_t G = 1, H = 0;

  Dgates() = default;
  Dgates(const Tensor& like_acts, int64_t G_, int64_t H_, bool gate_major, Scratch slot)
      : gm(gate_major), G(G_), H(H_) {
    const int64_t T_ = like_acts.size(0), B = like_acts.size(1);
    // gate-major never leaves the call (step_major() copies): scratch; step-major may (dgx)
    buf = gm ? scratch(slot, {G, T_, B, H}, like_acts.options()) : at::empty_like(like_acts);
  }
  int64_t T() const { return gm ? buf.size(1) : buf.size(0); }
  int64_t B() const { return gm ? buf.size(2) : buf.size(1); }
  // row b of step t, and the distance between its gate blocks
  template <typename T_>
  T_* row(int64_t t, int64_t b) const {
    return buf.data_ptr<T_>() + (gm ? (t * B() + b) * H : (t * B() + b) * G * H);
  }
  int64_t gate_stride() const { return gm ? T() * B() * H : H; }
  // (TB, GH) step-major (a copy if gate-major)
  Tensor flat() const {
    const int64_t TB = T() * B();
    if (!gm) return buf.view({TB, G * H});
    return buf.view({G, TB, H}).permute({1, 0, 2}).reshape({TB, G * H});
  }
  // (G, TB, H) gate-major and dense (a copy, made once, if step-major)
  Tensor by_gate() {
    if (gm) return buf.view({G, T() * B(), H});
    if (!cache.defined()) cache = buf.view({T() * B(), G, H}).transpose(0, 1).contiguous();
    return cache;
  }
  // row b of gate-major step t copied into the dense (G, B, H) `out` (the untied per-step
  // GEMM's operand): a (G, B, H) view of buf has batch stride T*B*H, and ATen hands oneDNN
  // such an operand only after its own copy
  template <typename T_>
  void row_to_dense(int64_t t, int64_t b, T_* out) const {
    const int64_t BH = B() * H, TBH = T() * BH;
    const T_* src = buf.data_ptr<T_>() + t * BH + b * H;
    for (int64_t k = 0; k < G; ++k) {
      std::memcpy(out + k * BH + b * H, src + k * TBH, H * sizeof(T_));
    }
  }
  Tensor step_flat(int64_t t) const { return buf[t]; }  // step-major only: (B, GH)
  Tensor bias_grad() const {
    return gm ? buf.view({G, T() * B(), H}).sum(1).view({G * H}) : flat().sum(0);
  }
  // (T, B, GH) for the caller (the projection's gradient, the input masks' gradient)
  Tensor step_major() const {
    if (!gm) return buf;
    auto out = at::empty({T(), B(), G * H}, buf.options());  // never a view of the scratch
    out.view({T() * B(), G, H}).copy_(buf.view({G, T() * B(), H}).permute({1, 0, 2}));
    return out;
  }

 private:
  Tensor cache;
};

// dW_hh = sum_t dg_t^T (masked h_{t-1}): one GEMM per gate group over all T*B rows
// (batched over gates when untied).
Tensor weight_hh_grad(Dgates& dg, const Tensor& h0, const Tensor& h_seq, const OptT& hm_seq,
                      bool reverse) {
  const int64_t T_ = dg.T(), B = dg.B(), G = dg.G, H = dg.H, GH = G * H;
  auto dw = at::empty({GH, H}, h0.options());
  if (has(hm_seq) && hm_seq->size(0) == 1) {
    gemm(dg.flat().t(), (*hm_seq)[0].view({T_ * B, H}), dw, 0.0f);
  } else if (has(hm_seq)) {  // (G, H, TB) @ (G, TB, H), batched over gates
    gemm(dg.by_gate().transpose(1, 2), hm_seq->view({G, T_ * B, H}), dw.view({G, H, H}),
         0.0f);
  } else {  // h_{t-1} is h_seq shifted by one step, h0 at the first step
    TORCH_CHECK(!dg.gm, "rnndrop: gate-major dgates come with a recurrent mask");
    const int64_t first = reverse ? T_ - 1 : 0;
    auto rest = reverse ? dg.buf.narrow(0, 0, T_ - 1) : dg.buf.narrow(0, 1, T_ - 1);
    auto prev = reverse ? h_seq.narrow(0, 1, T_ - 1) : h_seq.narrow(0, 0, T_ - 1);
    gemm(dg.buf[first].t(), h0, dw, 0.0f);
    if (T_ > 1) {
      gemm(rest.reshape({(T_ - 1) * B, GH}).t(), prev.reshape({(T_ - 1) * B, H}), dw, 1.0f);
    }
  }
  return dw;
}

// {dx, dW_ih, db} from dg = dL/d(x W_ih^T + b), each only where asked for; with untied input
// masks gate k saw x * in_mask_k.
std::array<Tensor, 3> input_grads(Dgates& dg, const Tensor& x, const Tensor& w_ih,
                                  const OptT& in_mask, bool has_bias, bool need_x,
                                  bool need_w) {
  const int64_t T_ = dg.T(), B = dg.B(), G = dg.G, H = dg.H;
  // per gate when the masks are untied or dgates are gate-major anyway; else one GEMM
  const bool per_gate = has(in_mask) || dg.gm;
  std::array<Tensor, 3> out;
  if (need_x) out[0] = at::empty_like(x);  // gate 0 writes it, the others add
  if (need_w) out[1] = at::empty_like(w_ih);
  if (!per_gate) {
    auto dg2 = dg.flat();
    if (need_x) gemm(dg2, w_ih, out[0].view({T_ * B, -1}), 0.0f);
    if (need_w) gemm(dg2.t(), x.view({T_ * B, -1}), out[1], 0.0f);
  } else {
    const Tensor dgm = dg.by_gate();
    Tensor xm = need_w && has(in_mask) ? scratch(kMaskedInput, x.sizes(), x.options()) : Tensor();
    Tensor dxk = need_x && has(in_mask) ? scratch(kInputGrad, x.sizes(), x.options()) : Tensor();
    for (int64_t k = 0; k < G; ++k) {
      auto wk = w_ih.narrow(0, k * H, H);
      if (need_x && has(in_mask)) {
        gemm(dgm[k], wk, dxk.view({T_ * B, -1}), 0.0f);
        if (k == 0) {
          at::mul_out(out[0], dxk, (*in_mask)[k]);
        } else {
          out[0].addcmul_(dxk, (*in_mask)[k]);  // no temporary product
        }
      } else if (need_x) {
        gemm(dgm[k], wk, out[0].view({T_ * B, -1}), k == 0 ? 0.0f : 1.0f);
      }
      if (need_w) {
        if (has(in_mask)) at::mul_out(xm, x, (*in_mask)[k]);
        gemm(dgm[k].t(), (has(in_mask) ? xm : x).view({T_ * B, -1}),
             out[1].narrow(0, k * H, H), 0.0f);
      }
    }
  }
  if (need_w && has_bias) out[2] = dg.bias_grad();
  return out;
}

// Runs f(T{}) with T the dtype of t: float32 or float64.
template <typename F>
auto by_dtype(const Tensor& t, const char* what, F&& f) {
  if (t.scalar_type() == at::kDouble) return f(double{});
  TORCH_CHECK(t.scalar_type() == at::kFloat, "rnndrop ", what, ": float32/float64 only");
  return f(float{});
}

// Runs f(b0, b1) over a step's batch rows, split across ATen's intra-op threads when the rows
// carry enough work to pay for the fork (row_work: elements of a row). Rows are independent,
// so the result is bitwise the same at any thread count; the threads flush subnormals as the
// caller does (FlushScope sets every intra-op thread).
template <typename F>
inline void for_rows(int64_t B, int64_t row_work, const F& f) {
  constexpr int64_t kChunkWork = 2048;  // elements per chunk, at least
  at::parallel_for(0, B, std::max<int64_t>(1, kChunkWork / std::max<int64_t>(row_work, 1)), f);
}

// ---- cells -------------------------------------------------------------------------
// The layer loop below is written once; a cell is a traits struct (cell_<name>.h) that
// gives the loop its layout and its pointwise math over one batch row of one step:
//   kName      the Python-visible prefix: <kName>_forward / <kName>_backward
//   G          gate blocks stacked in W_ih and W_hh (G*H rows)
//   kHasC      the state carries c beside h (c0, c_seq, ct_seq, dc)
//   kSplitRec  the recurrent product h W_hh^T + b_h enters the gates apart from the input
//              projection (GRU: r * (W_hn h + b_hn)), so the loop keeps it in its own buffer
//              and backward has a separate dL/d(recurrent product); else it is added into
//              the projection (both biases then in b_x) and the two gradients are one
//   kAux       the cell saves one (T, B, H) row per step for its backward (Saved.hn_seq)
//   saved_width(H)  optional: the width W of the row it saves per step in Saved.extra
//              (T, B, W) (the LayerNorm LSTM's normalised values and statistics)
//   kStepMasks the step masks it reads: step_mask::bits(step_mask::candidate, ...)
//              (step_masks.h); the loop treats the others as absent
//   forward<T, MASKED>(H, FwdRow<T>)  MASKED: a step mask it reads is present
//   backward<T, MG>(H, BwdRow<T>)     MG: write the mask gradients (concrete dropout)
// A cell's own parameters (LayerInputs.extra) arrive packed in one row `ex`, and backward
// adds their gradients into the batch row's `dex` (summed over the batch at the end).
// Step mask k arrives at m[k] (k = step_mask::<LayerMasks field>), its gradient row (MG) at
// dm[k]; an absent mask arrives as a row of ones (a multiplying mask) or zeros (zoneout's
// weight), step_mask::kAbsent, and an absent bias as zeros, so the row kernels stay
// branch-free. A new cell is its header, one #include and one register_cell line at the end
// of this file; a new step mask is a LayerMasks field and the cell headers that apply it.

// One batch row of one step, forward. Rows of G*H: a, p, bx, bh; rows of H: the rest.
template <typename T>
struct FwdRow {
  T* a;         // in: input projection (+ recurrent product unless kSplitRec); out: activations
  const T* p;   // kSplitRec: the recurrent product (h_{t-1} * m) W_hh^T, before b_h
  const T* bx;  // bias of the input projection
  const T* bh;  // bias of the recurrent product (kSplitRec)
  const T* hp;  // h_{t-1}
  const T* cp;  // c_{t-1} (kHasC)
  T* h;         // h_t
  T* c;         // c_t (kHasC)
  T* ct;        // c~_t, c before zoneout (kHasC; scratch without zoneout on c)
  T* aux;       // kAux: the cell's saved row
  const T* ex = nullptr;  // the cell's own parameters, packed (LayerInputs.extra)
  T* sv = nullptr;        // saved_width: the cell's row of Saved.extra
  std::array<const T*, step_mask::kCount> m{};  // the step masks' rows (step_masks.h)
};

// One batch row of one step, backward.
template <typename T>
struct BwdRow {
  const T* a;    // activations (G*H)
  const T* aux;  // kAux: the row forward saved
  const T* hp;   // h_{t-1}
  const T* cp;   // c_{t-1} (kHasC)
  const T* ct;   // c~_t (kHasC: c_t itself without zoneout on c)
  T* dh;   // in: total dL/dh_t; out: the direct gradient into h_{t-1} (beside W_hh's)
  T* dc;   // kHasC. in: dL/dc_t; out: dL/dc_{t-1}
  T* gx;   // out: dL/d(input projection), G blocks of H, block k at gx + k * gxs
  T* gh;   // out: dL/d(recurrent product), block k at gh + k * ghs; gx itself unless kSplitRec
  int64_t gxs;  // gate strides: H (step-major) or T*B*H (gate-major, see Dgates)
  int64_t ghs;
  const T* ex = nullptr;  // the cell's own parameters, packed
  const T* sv = nullptr;  // the row forward saved (saved_width)
  T* dex = nullptr;       // += this step's gradient of ex (this batch row's accumulator)
  std::array<const T*, step_mask::kCount> m{};  // the step masks' rows (step_masks.h)
  std::array<T*, step_mask::kCount> dm{};  // MG: their gradients of this step (scratch if absent)
  bool masked = true;  // some step mask the cell reads is present (false: a cell may skip them)
};

// Cell::saved_width(H), or 0 for a cell that saves no row of its own.
template <class Cell, class = void>
struct SavedWidth {
  static int64_t of(int64_t) { return 0; }
};
template <class Cell>
struct SavedWidth<Cell, std::void_t<decltype(Cell::saved_width(int64_t{}))>> {
  static int64_t of(int64_t H) { return Cell::saved_width(H); }
};

#include "cell_gru.h"
#include "cell_layernorm_lstm.h"
#include "cell_lstm.h"
#include "cell_rnn.h"

// ---- the layer, once for every cell ----------------------------------------------------

// Returns Saved's fields in its order: {acts, h_seq, c_seq, ct_seq, hm_seq, hn_seq, extra},
// each undefined (None) where the cell or the masks have none.
template <class Cell, typename T>
std::vector<Tensor> forward_impl(const Tensor& x, const OptT& w_ih, const OptT& b_x,
                                 const OptT& in_mask, const Tensor& w_hh, const OptT& b_h,
                                 const Tensor& h0, const OptT& c0, const OptT& rec_mask,
                                 const std::vector<OptT>& steps, bool reverse, const OptT& ex) {
  constexpr int64_t G = Cell::G;
  const int64_t T_ = x.size(0), B = x.size(1), H = w_hh.size(1), BH = B * H;
  Rows<T> rows(G * H);
  const StepMasks<T> sm(steps, Cell::kStepMasks, rows);
  const bool has_zc = Cell::kHasC && sm.present[step_mask::zoneout_c];  // ct_seq saved
  const auto rm = rec_mask_at<T>(rec_mask, rows.ones.data());
  Tensor acts = has(w_ih) ? project<T>(x, *w_ih, in_mask, H, G) : x.clone();
  const auto opts = x.options();
  auto h_seq = at::empty({T_, B, H}, opts);
  Tensor c_seq = Cell::kHasC ? at::empty({T_, B, H}, opts) : Tensor();
  Tensor ct_seq = has_zc ? at::empty({T_, B, H}, opts) : Tensor();
  Tensor hm_seq = rm.base ? at::empty({rm.groups, T_, B, H}, opts) : Tensor();
  Tensor aux_seq = Cell::kAux ? at::empty({T_, B, H}, opts) : Tensor();
  const int64_t W = SavedWidth<Cell>::of(H);
  Tensor sv_seq = W ? at::empty({T_, B, W}, opts) : Tensor();
  const T* EX = has(ex) ? ex->data_ptr<T>() : nullptr;
  T* SV = W ? sv_seq.data_ptr<T>() : nullptr;
  // kSplitRec: one step's recurrent product; else it goes straight into the gates
  Tensor rec = Cell::kSplitRec ? at::empty({B, G * H}, opts) : Tensor();
  // untied: (2, G, B, H), [1] the masked h_{t-1}, [0] its product (recurrent_product)
  const Tensor pg = rm.groups > 1 ? at::empty({2, G, B, H}, opts) : Tensor();
  std::array<Tensor, 2> per_gate;
  if (pg.defined()) per_gate = {pg[0], pg[1]};
  const T* PG = pg.defined() ? pg.data_ptr<T>() : nullptr;
  const Tensor whh = whh_forward(w_hh, rm.groups, G);
  const T* bx = has(w_ih) && has(b_x) ? b_x->data_ptr<T>() : rows.zeros.data();
  const T* bh = has(b_h) ? b_h->data_ptr<T>() : rows.zeros.data();
  T* A = acts.data_ptr<T>();
  T* Hs = h_seq.data_ptr<T>();
  T* Cs = Cell::kHasC ? c_seq.data_ptr<T>() : nullptr;
  T* CTs = has_zc ? ct_seq.data_ptr<T>() : nullptr;
  T* AX = Cell::kAux ? aux_seq.data_ptr<T>() : nullptr;
  T* P = Cell::kSplitRec ? rec.data_ptr<T>() : nullptr;
  T* HM = rm.base ? hm_seq.data_ptr<T>() : nullptr;
  T* HS = rm.groups > 1 ? per_gate[1].data_ptr<T>() : nullptr;
  for (int64_t b = 0; rm.base && T_ > 0 && b < B; ++b) {  // h0 masked for the first step
    mask_rec_row<T>(rm, reverse ? T_ - 1 : 0, b, H, h0.data_ptr<T>() + b * H, HM, T_, HS);
  }
  for (int64_t s = 0; s < T_; ++s) {
    const int64_t t = reverse ? T_ - 1 - s : s;
    const int64_t tp = reverse ? t + 1 : t - 1;
    const int64_t tn = s + 1 < T_ ? (reverse ? t - 1 : t + 1) : -1;  // the next step
    const T* hp = s == 0 ? h0.data_ptr<T>() : Hs + tp * BH;
    const T* cp = !Cell::kHasC ? nullptr : s == 0 ? c0->data_ptr<T>() : Cs + tp * BH;
    if constexpr (Cell::kSplitRec) {
      recurrent_product<T>(h0, h_seq, s == 0 ? -1 : tp, rm, hm_seq, t, whh, rec, 0.0f,
                           per_gate);
    } else {
      recurrent_product<T>(h0, h_seq, s == 0 ? -1 : tp, rm, hm_seq, t, whh, acts[t], 1.0f,
                           per_gate);
    }
    for_rows(B, G * H, [&](int64_t b0, int64_t b1) {
      std::vector<T> ct_junk(CTs ? 0 : H);  // c~ when nothing saves it
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t r = t * BH + b * H;
        if (PG) {  // untied: the product into `rec` (kSplitRec) or into the gates
          if constexpr (Cell::kSplitRec) {
            per_gate_row<false>(G, H, BH, b, P + b * G * H, PG);
          } else {
            per_gate_row<true>(G, H, BH, b, A + (t * B + b) * G * H, PG);
          }
        }
        FwdRow<T> row{A + (t * B + b) * G * H,
                      P ? P + b * G * H : nullptr,
                      bx,
                      bh,
                      hp + b * H,
                      cp ? cp + b * H : nullptr,
                      Hs + r,
                      Cs ? Cs + r : nullptr,
                      CTs ? CTs + r : ct_junk.data(),
                      AX ? AX + r : nullptr};
        row.ex = EX;
        row.sv = SV ? SV + (t * B + b) * W : nullptr;
        sm.rows(t, b, H, row.m);
        if (sm.any) {
          Cell::template forward<T, true>(H, row);
        } else {
          Cell::template forward<T, false>(H, row);
        }
        if (HM && tn >= 0) mask_rec_row<T>(rm, tn, b, H, Hs + r, HM, T_, HS);
      }
    });
  }
  return {acts, h_seq, c_seq, ct_seq, hm_seq, aux_seq, sv_seq};
}

// Returns {dgx, dx, dw_ih, db_x, dw_hh, db_h, dh0, dc0, drec, <one per step mask>, dex} (the
// mask gradients in LayerMasks' order):
// dgx = dL/d(input projection) (T, B, GH); dx, dw_ih, db_x only with w_ih (dw_ih, db_x with
// need_w, db_x with has_bias_x); dw_hh with need_w, db_h with has_bias_h too; dc0 for cells
// with a cell state; the mask gradients only with need_masks and their mask; dex, the
// gradient of the packed extra parameters, only with ex.
template <class Cell, typename T>
std::vector<Tensor> backward_impl(const OptT& dh_seq, const OptT& dc_last, const Tensor& x,
                                  const OptT& w_ih, bool has_bias_x, const OptT& in_mask,
                                  const Tensor& w_hh, bool has_bias_h, const Tensor& h0,
                                  const OptT& c0, const Tensor& acts, const Tensor& h_seq,
                                  const OptT& c_seq, const OptT& ct_seq, const OptT& hm_seq,
                                  const OptT& aux_seq, const OptT& rec_mask,
                                  const std::vector<OptT>& steps, bool reverse, bool need_x,
                                  bool need_w, bool need_masks, const OptT& ex,
                                  const OptT& sv_seq) {
  constexpr int64_t G = Cell::G;
  constexpr int K = step_mask::kCount;
  const int64_t T_ = acts.size(0), B = acts.size(1), H = w_hh.size(1), BH = B * H;
  Rows<T> rows(H);
  const StepMasks<T> sm(steps, Cell::kStepMasks, rows);
  const bool has_zc = Cell::kHasC && sm.present[step_mask::zoneout_c];  // ct_seq saved
  const auto rm = rec_mask_at<T>(rec_mask, rows.ones.data());
  const auto opts = acts.options();
  // dL/d(input projection) and dL/d(recurrent product): one buffer unless kSplitRec;
  // gate-major where untied GEMMs read them
  const bool untied_rec = rm.groups > 1;
  Dgates dgx(acts, G, H, Cell::kSplitRec ? (has(in_mask) && has(w_ih)) : untied_rec,
             kGateMajorX);
  Dgates dgh_split = Cell::kSplitRec ? Dgates(acts, G, H, untied_rec, kGateMajorH) : Dgates();
  Dgates& dgh = Cell::kSplitRec ? dgh_split : dgx;
  auto dh = at::zeros({B, H}, opts);  // carry, then total dL/dh_t
  Tensor dc = !Cell::kHasC ? Tensor() : has(dc_last) ? dc_last->clone() : at::zeros({B, H}, opts);
  Tensor dh_rec = at::empty({rm.groups, B, H}, opts);
  Tensor dg_step = untied_rec ? at::empty({G, B, H}, opts) : Tensor();  // see row_to_dense
  T* DGS = untied_rec ? dg_step.data_ptr<T>() : nullptr;
  auto w_gate = w_hh.view({G, H, H});  // W_hh_k, for the untied batched GEMM
  const T* A = acts.data_ptr<T>();
  const T* Hs = h_seq.data_ptr<T>();
  const T* Cs = Cell::kHasC ? c_seq->data_ptr<T>() : nullptr;
  const T* CTs = has_zc ? ct_seq->data_ptr<T>() : Cs;
  const T* AX = Cell::kAux ? aux_seq->data_ptr<T>() : nullptr;
  const T* DO = has(dh_seq) ? dh_seq->data_ptr<T>() : nullptr;
  T* DH = dh.data_ptr<T>();
  T* DC = Cell::kHasC ? dc.data_ptr<T>() : nullptr;
  const T* DR = dh_rec.data_ptr<T>();
  // mask gradients (concrete dropout): (T, B, H) per step mask present, else a scratch row
  std::array<Tensor, K> dstep;
  for (int k = 0; k < K; ++k) {
    if (need_masks && sm.present[k]) dstep[k] = at::empty({T_, B, H}, opts);
  }
  Tensor drec = need_masks && rm.base ? at::empty({T_, rm.groups, B, H}, opts) : Tensor();
  const int64_t W = SavedWidth<Cell>::of(H), NX = has(ex) ? ex->numel() : 0;
  const T* EX = NX ? ex->data_ptr<T>() : nullptr;
  const T* SV = W ? sv_seq->data_ptr<T>() : nullptr;
  Tensor dex = at::zeros({B, NX}, opts);  // per batch row, summed at the end
  T* DEX = dex.data_ptr<T>();
  int64_t t_next = -1;  // the step processed just before (t+1 in time order)
  for (int64_t s = T_ - 1; s >= 0; --s) {
    const int64_t t = reverse ? T_ - 1 - s : s;
    const int64_t tp = reverse ? t + 1 : t - 1;
    const T* hp = s == 0 ? h0.data_ptr<T>() : Hs + tp * BH;
    const T* cp = !Cell::kHasC ? nullptr : s == 0 ? c0->data_ptr<T>() : Cs + tp * BH;
    for_rows(B, G * H, [&](int64_t b0, int64_t b1) {
      std::vector<T> junk(need_masks ? K * H : 0);  // a mask gradient nobody reads
      auto out_row = [&](const Tensor& buf, int k, int64_t r) -> T* {
        return buf.defined() ? buf.data_ptr<T>() + r : junk.data() + k * H;
      };
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t r = t * BH + b * H;
        T* d = DH + b * H;
        gather_dh<T>(H, BH, b, d, DO ? DO + r : nullptr, DR, rm, t_next);
        BwdRow<T> row{A + (t * B + b) * G * H,
                      AX ? AX + r : nullptr,
                      hp + b * H,
                      cp ? cp + b * H : nullptr,
                      CTs ? CTs + r : nullptr,
                      d,
                      DC ? DC + b * H : nullptr,
                      dgx.row<T>(t, b),
                      dgh.row<T>(t, b),
                      dgx.gate_stride(),
                      dgh.gate_stride()};
        row.ex = EX;
        row.sv = SV ? SV + (t * B + b) * W : nullptr;
        row.dex = DEX + b * NX;
        sm.rows(t, b, H, row.m);
        row.masked = sm.any;
        if (need_masks) {
          for (int k = 0; k < K; ++k) row.dm[k] = out_row(dstep[k], k, r);
          Cell::template backward<T, true>(H, row);
        } else {
          Cell::template backward<T, false>(H, row);
        }
        if (DGS) dgh.row_to_dense<T>(t, b, DGS);
      }
    });
    recurrent_grad(untied_rec ? dg_step : dgh.step_flat(t), w_hh,
                   w_gate, dh_rec);
    if (drec.defined()) rec_mask_grad<T>(dh_rec, hp, drec, t);
    t_next = t;
  }
  for (int64_t b = 0; b < B; ++b) {  // the first step's recurrent input was h0
    gather_dh<T>(H, BH, b, DH + b * H, nullptr, DR, rm, t_next);
  }

  // the projection's gradient leaves the kernel where the caller reads it: as dx without
  // W_ih, and for the untied input masks' gradient (concrete dropout)
  Tensor dgx_out = !has(w_ih) || need_masks ? dgx.step_major() : Tensor();
  std::vector<Tensor> out{dgx_out, Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), dh, dc, drec};
  out.insert(out.end(), dstep.begin(), dstep.end());
  out.push_back(NX ? dex.sum(0) : Tensor());
  if (need_w) {
    out[4] = weight_hh_grad(dgh, h0, h_seq, hm_seq, reverse);
    if (has_bias_h) out[5] = dgh.bias_grad();
  }
  if (has(w_ih)) {
    auto g = input_grads(dgx, x, *w_ih, in_mask, has_bias_x, need_x, need_w);
    out[1] = g[0];
    out[2] = g[1];
    out[3] = g[2];
  }
  return out;
}

// The entry points, one pair per cell (register_cell): the fields of LayerInputs and Saved
// positionally, in the contract's order (rnndrop/kernels/cpp/__init__.py is the one caller),
// the step masks as one list (`steps`, step_masks.h's order).

inline void check_steps(const std::vector<OptT>& steps, const char* who) {
  TORCH_CHECK(steps.size() == static_cast<size_t>(step_mask::kCount), "rnndrop ", who,
              ": expected ", step_mask::kCount, " step masks (LayerMasks.step_names()), got ",
              steps.size(), "; the compiled kernel is out of date with rnndrop: rebuild it");
}

template <class Cell>
std::vector<Tensor> layer_forward(const Tensor& x, const OptT& w_ih, const OptT& b_x,
                                  const OptT& in_mask, const Tensor& w_hh, const OptT& b_h,
                                  const Tensor& h0, const OptT& c0, const OptT& rec_mask,
                                  const std::vector<OptT>& steps, bool reverse,
                                  const OptT& ex) {
  TORCH_CHECK(x.is_contiguous() && w_hh.is_contiguous() && h0.is_contiguous() &&
                  (!has(c0) || c0->is_contiguous()),
              "rnndrop ", Cell::kName, "_forward: inputs must be contiguous");
  TORCH_CHECK(has(c0) == Cell::kHasC, "rnndrop ", Cell::kName, "_forward: c0 must be ",
              Cell::kHasC ? "given" : "None");
  check_steps(steps, Cell::kName);
  FlushScope flush;
  return by_dtype(x, Cell::kName, [&](auto v) {
    return forward_impl<Cell, decltype(v)>(x, w_ih, b_x, in_mask, w_hh, b_h, h0, c0, rec_mask,
                                           steps, reverse, ex);
  });
}

template <class Cell>
std::vector<Tensor> layer_backward(const OptT& dh_seq, const OptT& dc_last, const Tensor& x,
                                   const OptT& w_ih, bool has_bias_x, const OptT& in_mask,
                                   const Tensor& w_hh, bool has_bias_h, const Tensor& h0,
                                   const OptT& c0, const Tensor& acts, const Tensor& h_seq,
                                   const OptT& c_seq, const OptT& ct_seq, const OptT& hm_seq,
                                   const OptT& hn_seq, const OptT& rec_mask,
                                   const std::vector<OptT>& steps, bool reverse, bool need_x,
                                   bool need_w, bool need_masks, const OptT& ex,
                                   const OptT& sv_seq) {
  TORCH_CHECK(!Cell::kHasC || (has(c0) && has(c_seq)), "rnndrop ", Cell::kName,
              "_backward: c0 and c_seq must be given");
  TORCH_CHECK(!Cell::kAux || has(hn_seq), "rnndrop ", Cell::kName,
              "_backward: hn_seq must be given");
  TORCH_CHECK(!SavedWidth<Cell>::of(1) || (has(ex) && has(sv_seq)), "rnndrop ", Cell::kName,
              "_backward: its extra parameters and saved rows must be given");
  check_steps(steps, Cell::kName);
  FlushScope flush;
  return by_dtype(acts, Cell::kName, [&](auto v) {
    return backward_impl<Cell, decltype(v)>(dh_seq, dc_last, x, w_ih, has_bias_x, in_mask, w_hh,
                                            has_bias_h, h0, c0, acts, h_seq, c_seq, ct_seq,
                                            hm_seq, hn_seq, rec_mask, steps, reverse, need_x,
                                            need_w, need_masks, ex, sv_seq);
  });
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

// <kName>_forward / <kName>_backward: the layer loop for one cell.
template <class Cell>
void register_cell(pybind11::module_& m) {
  const std::string name = Cell::kName;
  m.def((name + "_forward").c_str(), &layer_forward<Cell>,
        (name + " layer with the time loop, forward").c_str());
  m.def((name + "_backward").c_str(), &layer_backward<Cell>,
        (name + " layer with the time loop, backward").c_str());
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  register_cell<LstmCell>(m);  // the cell registry: one line per cell
  register_cell<GruCell>(m);
  register_cell<RnnCell<false>>(m);  // nn.RNN, tanh
  register_cell<RnnCell<true>>(m);   // nn.RNN, relu
  register_cell<LayerNormLstmCell>(m);
  m.def("uses_onednn", &uses_onednn, "True if GEMMs run in oneDNN");
  m.def("bernoulli_mask", &bernoulli_mask, "SplitMix64 dropout mask (see functional.py)");
  m.def("mask_mul", &mask_mul, "out = src * SplitMix64 dropout mask, mask never stored");
  m.def("set_flush", &set_flush, "Flush subnormals on this and every intra-op thread");
  m.def("flushing", &flushing, "True if this thread flushes subnormals (FTZ and DAZ)");
  m.def("set_loop_flush", &set_loop_flush, "Whether the loop flushes inside its calls");
}
