// Inverse block masks of EAT / data2vec 2.0 (SPEC section 3), computed on the CPU.
//
// The per-row algorithm is the one of `sslam/masking.py` (the readable reference); this file
// only declares the fast implementation. Every row draws from its own random stream derived
// from (seed, row), so a result depends on the seed and the row index alone, never on how the
// rows were split between threads.
#pragma once

#include <cstdint>

#include <pybind11/pybind11.h>

namespace sslam {

// The knobs of one mask family; grid = (grid_t time patches, grid_f frequency patches).
struct MaskParams {
    int64_t grid_t;
    int64_t grid_f;
    double mask_prob;     // fraction of tokens hidden from the student, in (0, 1)
    double adjust;        // mask_prob_adjust: extra block centres, >= 0
    int64_t mask_length;  // side of a square block, >= 1
    bool inverse;         // true: blocks mark KEPT tokens (EAT); false: blocks mark masked ones
    double mask_dropout;  // only inflates the number of centres, in [0, 1)
};

// How many centres each row draws and how many cells end up marked by the blocks (after the
// equalisation). Evaluated with the same double-precision expressions, in the same order, as
// `MaskConfig.num_centres` / `MaskConfig.num_marked` in Python, so both floor identically.
struct MaskCounts {
    int64_t num_centres;
    int64_t num_marked;
};

// Throws std::invalid_argument naming the offending parameter.
void validate(const MaskParams& params);

MaskCounts mask_counts(const MaskParams& params);

// Fills rows [row_begin, row_end) of the (num_rows, grid_t * grid_f) uint8 array `out`
// (1 = masked, i.e. hidden from the student). `out` points at row 0.
void block_mask_rows(const MaskParams& params, uint64_t seed, int64_t row_begin, int64_t row_end,
                     uint8_t* out);

// All `num_rows` rows, split over at most `threads` std::threads (0 = one per hardware thread).
void block_masks(const MaskParams& params, uint64_t seed, int64_t num_rows, int64_t threads,
                 uint8_t* out);

// Registers the Python functions of this file on the extension module.
void bind_masks(pybind11::module_& m);

}  // namespace sslam
