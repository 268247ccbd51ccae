// Inverse block masks (SPEC section 3): the multi-threaded CPU implementation.
//
// Per row (see `sslam/masking.py` for the readable version of the same steps):
//   1. draw `num_centres` flat positions uniformly in [0, L), with replacement;
//   2. mark the mask_length x mask_length block around each one, clamped to the grid;
//   3. equalise to exactly `num_marked` marked cells: unmark a uniform sample of the marked
//      cells when there are too many, mark a uniform sample of the unmarked ones when too few;
//   4. write 1 = masked: the unmarked cells when `inverse` (the blocks marked KEPT tokens),
//      the marked ones otherwise.
//
// Randomness: row r of seed s uses its own xoshiro256** stream seeded from a hash of (s, r), so
// the output depends on (seed, row) only and is identical for any number of threads. It is not
// bit-equal to torch's generator (the Python reference), only equal in distribution.

#include "masks.h"

#include <pybind11/numpy.h>

#include <algorithm>
#include <cstring>
#include <exception>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace py = pybind11;

namespace sslam {
namespace {

// Rows per thread below which starting another thread costs more than it saves (a row takes
// well under a microsecond; starting a thread takes tens of microseconds).
constexpr int64_t kMinRowsPerThread = 256;

// Grids larger than this would overflow the 32-bit bounded draws.
constexpr int64_t kMaxPatches = int64_t(1) << 31;

// SplitMix64 step: a bijective 64-bit mixer, used to turn (seed, row) into generator states.
inline uint64_t splitmix64(uint64_t& state) {
    uint64_t z = (state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

inline uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

// xoshiro256** (Blackman & Vigna): small state, fast, statistically strong.
class RowRng {
   public:
    RowRng(uint64_t seed, uint64_t row) {
        // Mix the seed first so that nearby seeds and nearby rows give unrelated streams; the
        // row enters through an odd-constant multiply, a bijection, so rows never collide.
        uint64_t mixer = seed;
        uint64_t chain = splitmix64(mixer) ^ (row * 0xD1B54A32D192ED03ull);
        for (uint64_t& word : state_) word = splitmix64(chain);
    }

    uint64_t next() {
        const uint64_t result = rotl(state_[1] * 5, 7) * 9;
        const uint64_t t = state_[1] << 17;
        state_[2] ^= state_[0];
        state_[3] ^= state_[1];
        state_[1] ^= state_[2];
        state_[0] ^= state_[3];
        state_[2] ^= t;
        state_[3] = rotl(state_[3], 45);
        return result;
    }

    // Uniform in [0, range) without modulo bias (Lemire's multiply-and-reject); range >= 1.
    uint32_t below(uint32_t range) {
        uint64_t product = uint64_t(uint32_t(next() >> 32)) * range;
        uint32_t low = uint32_t(product);
        if (low < range) {
            const uint32_t threshold = uint32_t(-range) % range;
            while (low < threshold) {
                product = uint64_t(uint32_t(next() >> 32)) * range;
                low = uint32_t(product);
            }
        }
        return uint32_t(product >> 32);
    }

   private:
    uint64_t state_[4];
};

// Everything a row needs, derived once from MaskParams.
struct RowPlan {
    int64_t grid_t, grid_f, length;
    int64_t num_centres, num_marked;
    int64_t offset_lo, offset_hi;  // block cells are centre + [offset_lo, offset_hi]
    bool inverse;

    explicit RowPlan(const MaskParams& p) {
        grid_t = p.grid_t;
        grid_f = p.grid_f;
        length = p.grid_t * p.grid_f;
        const MaskCounts counts = mask_counts(p);
        num_centres = counts.num_centres;
        num_marked = counts.num_marked;
        // Offsets i - l // 2 for i in 0..l-1, as in the official implementation (-2..2 for 5,
        // -2..1 for 4).
        offset_lo = -(p.mask_length / 2);
        offset_hi = p.mask_length - 1 - p.mask_length / 2;
        inverse = p.inverse;
    }
};

// Flips `count` cells of `row` currently equal to `value`, chosen uniformly without
// replacement among the `candidates` such cells. `scratch` holds at least `length` entries.
void flip_uniform_sample(uint8_t* row, int64_t length, uint8_t value, int64_t count,
                         int64_t candidates, RowRng& rng_state, uint32_t* scratch) {
    // Draw from a local copy: a byte store may alias anything the caller can reach, so the
    // compiler would otherwise write the generator state back to memory on every draw.
    RowRng rng = rng_state;
    const uint8_t flipped = value ^ 1;
    if ((candidates - count) * 4 >= length) {
        // Rejection: every draw lands on a remaining candidate with probability >= 1/4, and an
        // accepted draw is uniform over the candidates still unflipped, so the chosen set is a
        // uniform sample without replacement -- without scanning the row.
        while (count > 0) {
            const uint32_t cell = rng.below(uint32_t(length));
            if (row[cell] == value) {
                row[cell] = flipped;
                --count;
            }
        }
        rng_state = rng;
        return;
    }
    // Few candidates: list them (branch-free) and take a partial Fisher-Yates shuffle.
    int64_t listed = 0;
    for (int64_t i = 0; i < length; ++i) {
        scratch[listed] = uint32_t(i);
        listed += (row[i] == value);
    }
    for (int64_t i = 0; i < count; ++i) {
        const int64_t j = i + rng.below(uint32_t(listed - i));
        std::swap(scratch[i], scratch[j]);
        row[scratch[i]] = flipped;
    }
    rng_state = rng;
}

// One mask row, written directly in output polarity (1 = masked): the blocks' marked value is
// 0 when `inverse` (they mark kept tokens), 1 otherwise, which saves a final inversion pass.
void fill_row(const RowPlan& plan, uint64_t seed, int64_t row_index, uint8_t* row,
              uint32_t* marked_cells, uint32_t* scratch) {
    // The row's own stream; a local whose address never escapes stays in registers.
    RowRng rng(seed, uint64_t(row_index));
    const int64_t length = plan.length;
    const uint8_t unmarked = plan.inverse ? 1 : 0;
    const uint8_t marked = unmarked ^ 1;
    std::memset(row, unmarked, size_t(length));

    // Mark the blocks, listing every cell the first time it is marked: the list gives the
    // marked count and, when there are too many, the population to unmark from, without any
    // pass over the whole row.
    int64_t num_marked = 0;
    for (int64_t c = 0; c < plan.num_centres; ++c) {
        const int64_t centre = rng.below(uint32_t(length));
        const int64_t t = centre / plan.grid_f;
        const int64_t f = centre - t * plan.grid_f;
        // Clamped to the grid as in the official code; the covered cells stay a rectangle.
        const int64_t t0 = std::max<int64_t>(t + plan.offset_lo, 0);
        const int64_t t1 = std::min<int64_t>(t + plan.offset_hi, plan.grid_t - 1);
        const int64_t f0 = std::max<int64_t>(f + plan.offset_lo, 0);
        const int64_t f1 = std::min<int64_t>(f + plan.offset_hi, plan.grid_f - 1);
        for (int64_t tt = t0; tt <= t1; ++tt) {
            for (int64_t cell = tt * plan.grid_f + f0; cell <= tt * plan.grid_f + f1; ++cell) {
                marked_cells[num_marked] = uint32_t(cell);
                num_marked += (row[cell] != marked);
                row[cell] = marked;
            }
        }
    }

    if (num_marked > plan.num_marked) {
        // Unmark a uniform sample of the listed cells: partial Fisher-Yates over the list.
        const int64_t excess = num_marked - plan.num_marked;
        for (int64_t i = 0; i < excess; ++i) {
            const int64_t j = i + rng.below(uint32_t(num_marked - i));
            std::swap(marked_cells[i], marked_cells[j]);
            row[marked_cells[i]] = unmarked;
        }
    } else if (num_marked < plan.num_marked) {
        flip_uniform_sample(row, length, unmarked, plan.num_marked - num_marked,
                            length - num_marked, rng, scratch);
    }
}

void require(bool ok, const std::string& message) {
    if (!ok) throw std::invalid_argument(message);
}

}  // namespace

void validate(const MaskParams& p) {
    require(p.grid_t >= 1 && p.grid_f >= 1,
            "grid: both sizes must be >= 1, got (" + std::to_string(p.grid_t) + ", " +
                std::to_string(p.grid_f) + ")");
    require(p.grid_t <= kMaxPatches / p.grid_f,
            "grid: at most 2**31 patches are supported, got " + std::to_string(p.grid_t) + " x " +
                std::to_string(p.grid_f));
    require(p.mask_prob > 0.0 && p.mask_prob < 1.0,
            "mask_prob must lie in (0, 1), got " + std::to_string(p.mask_prob));
    require(p.adjust >= 0.0 && p.adjust <= 1.0,
            "mask_prob_adjust must lie in [0, 1], got " + std::to_string(p.adjust));
    // Bounded like the grid (and MaskConfig) so that mask_length * mask_length in mask_counts
    // cannot overflow int64; a longer block would cover any supported grid anyway.
    require(p.mask_length >= 1 && p.mask_length <= kMaxPatches,
            "mask_length must lie in [1, 2**31], got " + std::to_string(p.mask_length));
    require(p.mask_dropout >= 0.0 && p.mask_dropout < 1.0,
            "mask_dropout must lie in [0, 1), got " + std::to_string(p.mask_dropout));
}

MaskCounts mask_counts(const MaskParams& p) {
    // Same expressions and evaluation order as MaskConfig in Python (IEEE doubles, truncation
    // toward zero), so the two implementations agree even where the product is within an ulp
    // of an integer (e.g. 1 - 0.8 = 0.19999999999999996).
    const double length = double(p.grid_t * p.grid_f);
    const double marked_fraction = p.inverse ? 1.0 - p.mask_prob : p.mask_prob;
    const double block_cells = double(p.mask_length * p.mask_length);
    MaskCounts counts;
    counts.num_centres = int64_t(length * ((marked_fraction + p.adjust) / block_cells) *
                                 (1.0 + p.mask_dropout));
    counts.num_marked = int64_t(length * marked_fraction);
    return counts;
}

void block_mask_rows(const MaskParams& params, uint64_t seed, int64_t row_begin, int64_t row_end,
                     uint8_t* out) {
    const RowPlan plan(params);
    // The marked-cell list may hold every cell (blocks can cover the whole grid), plus the
    // slot the branch-free append writes before knowing whether a cell was new.
    std::vector<uint32_t> marked_cells(size_t(plan.length) + 1);
    std::vector<uint32_t> scratch(size_t(plan.length));
    for (int64_t r = row_begin; r < row_end; ++r) {
        fill_row(plan, seed, r, out + r * plan.length, marked_cells.data(), scratch.data());
    }
}

void block_masks(const MaskParams& params, uint64_t seed, int64_t num_rows, int64_t threads,
                 uint8_t* out) {
    validate(params);
    require(num_rows >= 0, "num_rows must be >= 0, got " + std::to_string(num_rows));
    require(threads >= 0, "threads must be >= 0 (0 = all hardware threads), got " +
                              std::to_string(threads));
    // More threads than the hardware runs only add start-up cost (rows do not depend on the
    // thread count, so capping changes no result).
    const int64_t hardware = std::max<int64_t>(1, std::thread::hardware_concurrency());
    threads = threads == 0 ? hardware : std::min(threads, hardware);
    const int64_t useful = (num_rows + kMinRowsPerThread - 1) / kMinRowsPerThread;
    const int64_t workers = std::max<int64_t>(1, std::min(threads, useful));
    if (workers == 1) {
        block_mask_rows(params, seed, 0, num_rows, out);
        return;
    }

    const int64_t chunk = (num_rows + workers - 1) / workers;
    std::vector<std::exception_ptr> errors(static_cast<size_t>(workers));
    std::vector<std::thread> pool;
    pool.reserve(size_t(workers));
    try {
        for (int64_t w = 0; w < workers; ++w) {
            const int64_t begin = std::min(num_rows, w * chunk);
            const int64_t end = std::min(num_rows, begin + chunk);
            pool.emplace_back([&, w, begin, end] {
                try {
                    block_mask_rows(params, seed, begin, end, out);
                } catch (...) {
                    errors[size_t(w)] = std::current_exception();
                }
            });
        }
    } catch (...) {
        // Starting a thread failed: wait for the ones already running (a joinable
        // std::thread must not be destroyed) and report the failure.
        for (std::thread& worker : pool) worker.join();
        throw;
    }
    for (std::thread& worker : pool) worker.join();
    for (const std::exception_ptr& error : errors) {
        if (error) std::rethrow_exception(error);
    }
}

namespace {

MaskParams make_params(int64_t grid_t, int64_t grid_f, double mask_prob, double adjust,
                       int64_t mask_length, bool inverse, double mask_dropout) {
    MaskParams p{grid_t, grid_f, mask_prob, adjust, mask_length, inverse, mask_dropout};
    validate(p);
    return p;
}

py::array_t<bool> block_masks_py(int64_t num_rows, int64_t grid_t, int64_t grid_f,
                                 double mask_prob, double adjust, int64_t mask_length,
                                 bool inverse, double mask_dropout, uint64_t seed,
                                 int64_t threads) {
    const MaskParams params =
        make_params(grid_t, grid_f, mask_prob, adjust, mask_length, inverse, mask_dropout);
    require(num_rows >= 0, "num_rows must be >= 0, got " + std::to_string(num_rows));
    py::array_t<bool> result({num_rows, grid_t * grid_f});
    // numpy bools are one byte holding 0 or 1, exactly what the workers write.
    uint8_t* data = reinterpret_cast<uint8_t*>(result.mutable_data());
    {
        py::gil_scoped_release release;
        block_masks(params, seed, num_rows, threads, data);
    }
    return result;
}

py::tuple mask_counts_py(int64_t grid_t, int64_t grid_f, double mask_prob, double adjust,
                         int64_t mask_length, bool inverse, double mask_dropout) {
    const MaskCounts counts = mask_counts(
        make_params(grid_t, grid_f, mask_prob, adjust, mask_length, inverse, mask_dropout));
    return py::make_tuple(counts.num_centres, counts.num_marked);
}

}  // namespace

void bind_masks(py::module_& m) {
    m.def("block_masks", &block_masks_py, py::arg("num_rows"), py::arg("grid_t"),
          py::arg("grid_f"), py::arg("mask_prob"), py::arg("adjust"), py::arg("mask_length"),
          py::arg("inverse"), py::arg("mask_dropout"), py::arg("seed"), py::arg("threads"),
          R"doc(Inverse block masks, numpy bool (num_rows, grid_t * grid_f), True = masked.

Row r depends only on (seed, r): the result is identical for any `threads`
(0 = one worker per hardware thread). Releases the GIL while computing.)doc");
    m.def("mask_counts", &mask_counts_py, py::arg("grid_t"), py::arg("grid_f"),
          py::arg("mask_prob"), py::arg("adjust"), py::arg("mask_length"), py::arg("inverse"),
          py::arg("mask_dropout"),
          "(num_centres, num_marked) per row, evaluated exactly as the C++ masks use them.");
}

}  // namespace sslam
