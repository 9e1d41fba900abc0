// rnndrop: the positions of the per-step masks (the "step" fields of LayerMasks, in
// rnndrop/kernels/contract.py) in the list the adapter passes and in FwdRow / BwdRow.
//
// Generated, not written: build.py defines, from LayerMasks,
//   RNNDROP_STEP_MASKS        their names in the adapter's order (candidate,cell,...)
//   RNNDROP_STEP_MASK_ABSENT  the value standing for each when it is absent (1 or 0)
// and both are in the build's cache key. A site added to LayerMasks is therefore a new
// position here after the rebuild; only the cell headers that apply it name it
// (step_mask::<field name>), and loop.cpp never does.
//
// Included by loop.cpp inside its namespace.

#pragma once

#if !defined(RNNDROP_STEP_MASKS) || !defined(RNNDROP_STEP_MASK_ABSENT)
#error "rnndrop: build loop.cpp through rnndrop/kernels/cpp/build.py (it defines the step masks)"
#endif

namespace step_mask {

// candidate, cell, zoneout_h, ... = 0, 1, 2, ...; kCount: how many there are
enum : int { RNNDROP_STEP_MASKS, kCount };

// 1: a mask that multiplies (absent = a row of ones); 0: a weight of the previous value
// (zoneout; absent = a row of zeros)
constexpr int kAbsent[kCount] = {RNNDROP_STEP_MASK_ABSENT};

// The set of positions a cell reads, as bits (a cell's kStepMasks).
template <typename... I>
constexpr unsigned bits(I... i) {
  return (0u | ... | (1u << i));
}

static_assert(kCount <= 32, "step_mask::bits holds 32 positions");

}  // namespace step_mask
