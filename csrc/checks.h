// Argument checks shared by the CPU and CUDA bindings. The Python front checks tensors (dtype, contiguity, device,
// shape) and nothing else; everything it hands over as plain numbers - pointers, sizes, strides, coefficients, the
// clip bound, the guidance scale, the Philox counter words - is checked here, once, by name, so that a wrong call
// from anywhere is an exception, never a wild write.
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

// An optional float32 buffer: 0 means absent (nullptr), anything else must be a valid float_ptr.
template <class T>
T* optional_float_ptr(std::uintptr_t address, const char* name) {
  return address == 0 ? nullptr : float_ptr<T>(address, name);
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

// The per-sample stride (elements from the start of sample k to that of sample k + 1) of an operand read row by
// row (m, uncond, variance: e.g. the halves out[:, :C], out[:, C:] of a learned-variance model's [N, 2C, ...]
// output). 0 means d (contiguous samples). At least d, so that samples do not overlap, and small enough that the
// last sample's end fits int64 arithmetic. The Python front checks that each sample's d elements are contiguous.
inline int64_t check_stride(int64_t stride, int64_t n, int64_t d, const char* name) {
  if (stride == 0) return d;
  DDPM_REQUIRE(stride >= d, std::string(name) + " must be >= d = " + std::to_string(d) +
                                " (the elements of one sample), got " + std::to_string(stride));
  DDPM_REQUIRE(n <= 1 || stride <= (std::numeric_limits<int64_t>::max() / 4 - d) / (n - 1),
               std::string(name) + " is too large: (n - 1) * stride + d overflows");
  return stride;
}

// The bytes spanned by n samples of d elements, sample k starting at element k * stride.
inline uint64_t span_bytes(int64_t n, int64_t d, int64_t stride) {
  return n == 0 ? 0 : static_cast<uint64_t>((n - 1) * stride + d) * sizeof(float);
}

// Where the fused step's operands live: addresses (0 = absent) and the bytes each spans. x, out and history are
// contiguous [n, d]; m, uncond and variance are read row by row with their own strides; thresholds is [n].
struct OperandSpans {
  std::uintptr_t x, m, out, history, uncond, variance, thresholds;
  uint64_t bytes;                                  // x, out, history: n * d floats
  uint64_t m_bytes, uncond_bytes, variance_bytes;  // spans of the strided operands
  uint64_t threshold_bytes;                        // n floats
  bool m_contiguous;                               // m's stride is d, so out == m (in place) is allowed
};

inline bool spans_overlap(std::uintptr_t a, uint64_t a_bytes, std::uintptr_t b, uint64_t b_bytes) {
  return a != 0 && b != 0 && a < b + b_bytes && b < a + a_bytes;
}

// Which operands may share memory. out may be exactly x, or exactly m when m is contiguous: each element is read
// before it is written. Every other operand is read in the same pass in which out and history are written, so it
// may not share a byte with either (read-only operands may overlap each other and x, m freely).
inline void check_operand_overlaps(const OperandSpans& s) {
  const bool x_overlap = spans_overlap(s.out, s.bytes, s.x, s.bytes);
  DDPM_REQUIRE(s.out == s.x || !x_overlap,
               "out and x overlap without being the same buffer (in-place needs out to be exactly x or m)");
  const bool m_overlap = spans_overlap(s.out, s.bytes, s.m, s.m_bytes);
  if (s.m_contiguous) {
    DDPM_REQUIRE(s.out == s.m || !m_overlap,
                 "out and m overlap without being the same buffer (in-place needs out to be exactly x or m)");
  } else {
    DDPM_REQUIRE(!m_overlap, "out must not overlap m: m's samples are strided, so out cannot be m (in place)");
  }
  struct Read {
    std::uintptr_t at;
    uint64_t bytes;
    const char* name;
  };
  const Read reads[] = {{s.uncond, s.uncond_bytes, "uncond"},
                        {s.variance, s.variance_bytes, "variance"},
                        {s.thresholds, s.threshold_bytes, "thresholds"}};
  for (const Read& r : reads) {
    DDPM_REQUIRE(!spans_overlap(r.at, r.bytes, s.out, s.bytes),
                 std::string(r.name) + " must not overlap out (it is read while out is written)");
    DDPM_REQUIRE(!spans_overlap(r.at, r.bytes, s.history, s.bytes),
                 std::string(r.name) + " must not overlap history (it is read while history is written)");
  }
  if (s.history != 0) {  // h is read and written in the same pass as x, m and out
    const Read others[] = {{s.x, s.bytes, "x"}, {s.m, s.m_bytes, "m"}, {s.out, s.bytes, "out"}};
    for (const Read& r : others) {
      DDPM_REQUIRE(!spans_overlap(s.history, s.bytes, r.at, r.bytes),
                   std::string("history must not overlap ") + r.name + " (history needs its own buffer)");
    }
  }
}

// A row with c != 0 adds c h: it needs the history buffer h (the kernels would otherwise drop the term).
inline void check_history(float c, bool have_history) {
  DDPM_REQUIRE(c == 0.0f || have_history,
               "coefficient c = " + std::to_string(c) + " != 0 needs a history buffer (the previous x0_hat)");
}

// A coefficient row: the six coefficients of a step, in table column order (ddpm.schedule.COEF_A .. COEF_SIGMA),
// plus, for a learned-range variance (ddpm.schedule.COEF_LV0, COEF_LV1), the two coefficients of
// sigma = exp(lv0 + lv1 v) with v the model's variance output.
constexpr int kNumCoefs = 6;
constexpr int kNumCoefsLearned = 8;
constexpr const char* kCoefNames[kNumCoefsLearned] = {"a", "b", "c", "p", "q", "sigma", "lv0", "lv1"};

inline void check_finite(float v, const char* name) {
  DDPM_REQUIRE(std::isfinite(v), std::string("coefficient ") + name + " is not finite: " + std::to_string(v));
}

inline void check_width(int64_t cols) {
  DDPM_REQUIRE(cols == kNumCoefs || cols == kNumCoefsLearned,
               "a coefficient table has 6 columns (a, b, c, p, q, sigma) or 8 (plus lv0, lv1 of a learned-range "
               "variance), got " + std::to_string(cols));
}

// A [rows, cols] coefficient table, every entry finite; the message names the column and the row.
inline void check_table(const float* table, int64_t rows, int64_t cols) {
  check_width(cols);
  DDPM_REQUIRE(rows >= 1 && rows < (int64_t{1} << 31),
               "table rows must be in 1..2^31-1, got " + std::to_string(rows));
  for (int64_t i = 0; i < rows * cols; ++i) {
    DDPM_REQUIRE(std::isfinite(table[i]), std::string("coefficient ") + kCoefNames[i % cols] + " of table row " +
                                              std::to_string(i / cols) + " is not finite: " +
                                              std::to_string(table[i]));
  }
}

// An 8-wide row (learned-range variance) needs the variance operand, and the variance operand an 8-wide row.
inline void check_variance(int64_t cols, bool have_variance) {
  DDPM_REQUIRE(cols == kNumCoefsLearned || !have_variance,
               "a variance operand needs an 8-wide coefficient row (a, b, c, p, q, sigma, lv0, lv1: "
               "variance=learned_range); this row has 6");
  DDPM_REQUIRE(cols != kNumCoefsLearned || have_variance,
               "an 8-wide coefficient row (learned-range variance) needs the variance operand (the model's "
               "variance output v)");
}

inline void check_clip(float clip) {
  DDPM_REQUIRE(clip > 0.0f, "clip must be > 0 (+inf for no clipping), got " + std::to_string(clip));
}

// Per-sample thresholds replace the static clip bound: asking for both is a mistake, not a combination.
inline void check_thresholds_clip(float clip, bool have_thresholds) {
  DDPM_REQUIRE(!have_thresholds || std::isinf(clip),
               "thresholds replace the clip bound: pass clip = +inf with thresholds, got clip " +
                   std::to_string(clip));
}

// Classifier-free guidance m_g = u + S (m - u): S finite; S != 1 without the unconditional output u is a mistake.
inline void check_guidance(double guidance, bool have_uncond) {
  DDPM_REQUIRE(std::isfinite(guidance) && std::isfinite(static_cast<float>(guidance)),
               "guidance must be a finite float32 number, got " + std::to_string(guidance));
  DDPM_REQUIRE(have_uncond || guidance == 1.0,
               "guidance = " + std::to_string(guidance) + " != 1 needs uncond (the unconditional model output)");
}

// Dynamic thresholding (Imagen): ratio in (0, 1], max_value >= 1 (+inf: no upper bound).
inline void check_dynamic(double ratio, double max_value) {
  DDPM_REQUIRE(ratio > 0.0 && ratio <= 1.0, "ratio must be in (0, 1], got " + std::to_string(ratio));
  DDPM_REQUIRE(max_value >= 1.0, "max_value must be >= 1 (+inf for none), got " + std::to_string(max_value));
}

}  // namespace ddpm
