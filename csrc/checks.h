// Argument checks shared by the CPU and CUDA bindings. The Python front checks tensors (dtype, contiguity, device,
// shape) and nothing else; everything it hands over as plain numbers - pointers, sizes, coefficients, the clip
// bound, the Philox counter words - is checked here, once, by name, so that a wrong call from anywhere is an
// exception, never a wild write.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>

namespace ddpm {

// Throw std::invalid_argument (Python: ValueError) with `msg`, which is built only on failure: these checks run
// on every kernel call, and formatting strings there would cost more than a small kernel.
#define DDPM_REQUIRE(cond, msg)                                    \
  do {                                                             \
    if (!(cond)) throw std::invalid_argument(std::string(msg));    \
  } while (0)

// A float32 buffer pointer: non-null and 4-byte aligned.
template <class T>
T* float_ptr(std::uintptr_t address, const char* name) {
  DDPM_REQUIRE(address != 0, std::string(name) + " is a null pointer");
  DDPM_REQUIRE(address % alignof(float) == 0, std::string(name) + " is not 4-byte aligned (a float32 buffer?)");
  return reinterpret_cast<T*>(address);
}

// n samples of d elements: n >= 0, d >= 1, n * d fits, the global sample indices sample_offset .. +n-1 and the
// group index ceil(d / 4) - 1 fit their 32-bit counter words.
inline void check_sizes(int64_t n, int64_t d, uint32_t sample_offset) {
  DDPM_REQUIRE(n >= 0, "n (samples) must be >= 0, got " + std::to_string(n));
  DDPM_REQUIRE(d >= 1, "d (elements per sample) must be >= 1, got " + std::to_string(d));
  DDPM_REQUIRE(n <= std::numeric_limits<int64_t>::max() / 4 / d, "n * d is too large");
  DDPM_REQUIRE((d + 3) / 4 <= (int64_t{1} << 32),
          "d (elements per sample) must be <= 2^34: the Philox counter word for the element is 32-bit");
  DDPM_REQUIRE(static_cast<uint64_t>(sample_offset) + static_cast<uint64_t>(n) <= (uint64_t{1} << 32),
          "sample_offset + N must be <= 2^32 (the global sample index is a 32-bit counter word), got " +
              std::to_string(sample_offset) + " + " + std::to_string(n));
}

// Two buffers of `bytes` each may be the same buffer (in place) but must not partly overlap.
inline void check_no_partial_overlap(std::uintptr_t a, const char* name_a, std::uintptr_t b, const char* name_b,
                                     uint64_t bytes) {
  const bool overlap = a < b + bytes && b < a + bytes;
  DDPM_REQUIRE(a == b || !overlap, std::string(name_a) + " and " + name_b +
                                  " overlap without being the same buffer (in-place needs out to be exactly x or m)");
}

// h (history) is read and written in the same pass as x, m and out, so it may not share a byte with any of them.
inline void check_disjoint(std::uintptr_t a, const char* name_a, std::uintptr_t b, const char* name_b,
                           uint64_t bytes) {
  DDPM_REQUIRE(!(a < b + bytes && b < a + bytes),
               std::string(name_a) + " must not overlap " + name_b + " (history needs its own buffer)");
}

// A row with c != 0 adds c h: it needs the history buffer h (the kernels would otherwise drop the term).
inline void check_history(float c, bool have_history) {
  DDPM_REQUIRE(c == 0.0f || have_history,
               "coefficient c = " + std::to_string(c) + " != 0 needs a history buffer (the previous x0_hat)");
}

// The six coefficients of a step, in table column order (ddpm.schedule.COEF_A .. COEF_SIGMA).
constexpr int kNumCoefs = 6;
constexpr const char* kCoefNames[kNumCoefs] = {"a", "b", "c", "p", "q", "sigma"};

inline void check_finite(float v, const char* name) {
  DDPM_REQUIRE(std::isfinite(v), std::string("coefficient ") + name + " is not finite: " + std::to_string(v));
}

// A [rows, 6] coefficient table, every entry finite; the message names the column and the row.
inline void check_table(const float* table, int64_t rows) {
  DDPM_REQUIRE(rows >= 1 && rows < (int64_t{1} << 31),
               "table rows must be in 1..2^31-1, got " + std::to_string(rows));
  for (int64_t i = 0; i < rows * kNumCoefs; ++i) {
    DDPM_REQUIRE(std::isfinite(table[i]), std::string("coefficient ") + kCoefNames[i % kNumCoefs] + " of table row " +
                                              std::to_string(i / kNumCoefs) + " is not finite: " +
                                              std::to_string(table[i]));
  }
}

inline void check_clip(float clip) {
  DDPM_REQUIRE(clip > 0.0f, "clip must be > 0 (+inf for no clipping), got " + std::to_string(clip));
}

}  // namespace ddpm
