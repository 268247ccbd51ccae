// Entry point of the optional extension `sslam._native` (numpy in, numpy out; not linked to
// torch). Each concept lives in its own file and registers its functions here.

#include <pybind11/pybind11.h>

#include "masks.h"

PYBIND11_MODULE(_native, m) {
    m.doc() = "Optional C++ helpers of sslam (CPU-side work: inverse block masks).";
    sslam::bind_masks(m);
}
