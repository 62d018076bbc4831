// CPU kernels of ddpm._C: the fused reverse step and the noise generator (declarations).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace ddpm::cpu {

// out = a x + b x0 + c h + sigma z with x0 = clip(p x + q m, -clip, clip), over n samples of d elements each
// (row-major [n, d], float32, contiguous); z = normal(seed, step, stream 0, global sample sample_offset + row).
// With a history buffer h (same layout), h <- x0 in the same pass, after its old value is read; c == 0 never
// reads h (it may hold garbage). out may be x or m (in place); h overlaps none of x, m, out.
// sigma == 0 skips the noise; clip = +inf disables clipping.
struct StepArgs {
  const float* x;
  const float* m;
  float* out;
  float* h;  // nullptr: no history
  int64_t n;
  int64_t d;
  float a, b, c, p, q, sigma, clip;
  uint64_t seed;
  uint32_t step;
  uint32_t sample_offset;
};

// out[n, d] = the N(0, 1) draws of (seed, step, stream) for global samples sample_offset .. sample_offset + n - 1.
struct NormalArgs {
  float* out;
  int64_t n;
  int64_t d;
  uint64_t seed;
  uint32_t step;
  uint32_t stream;
  uint32_t sample_offset;
};

void fused_step(const StepArgs& args);
void normal(const NormalArgs& args);

// out[count, 4] = the Philox words of counters (c0 + i, sample, step, stream), i < count, under the key of `seed`,
// computed by the dispatched variant's Philox (a test hook: SIMD Philox vs Random123's known answers).
void philox_words(uint32_t* out, uint32_t c0, uint32_t count, uint32_t sample, uint32_t step, uint32_t stream,
                  uint64_t seed);

// Tensors with fewer elements than this run on one thread (a fork/join costs more than it saves there).
int64_t parallel_threshold();
void set_parallel_threshold(int64_t elements);

// Which instruction set the kernels dispatch to ("avx512", "avx2", "baseline"): the best this CPU runs unless
// set_simd_target chose another (tests run every variant; "" restores the automatic choice).
const char* simd_target();
std::vector<std::string> simd_targets();
void set_simd_target(const std::string& name);

}  // namespace ddpm::cpu
