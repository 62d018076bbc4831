// CUDA kernels of ddpm._C_cuda: the fused reverse step (by-value coefficients, or a device table row at a device
// step counter for CUDA graphs) and the noise generator. Declarations only: no CUDA headers, so the pybind11
// bindings compile as plain C++.
#pragma once

#include <cstdint>

namespace ddpm::cuda {

// One fused step (step_cpu.h's contract): x0 = clip(p x + q m), out = a x + b x0 + c h + sigma z, h <- x0, with the
// optional operands of step_cpu.h's StepArgs (guidance's u, per-sample thresholds, the learned-range variance v).
struct StepLaunch {
  const float* x;
  const float* m;
  float* out;
  float* h;                        // history buffer, or nullptr
  const float* u;                  // unconditional output (guidance), or nullptr
  const float* v;                  // variance output (learned range, needs 8-wide rows), or nullptr
  const float* thr;                // [n] per-sample thresholds, or nullptr
  int64_t n, d;
  int64_t m_stride, u_stride, v_stride;  // elements between samples (>= d)
  float a, b, c, p, q, sigma, lv0, lv1;  // used when table == nullptr
  const float* table;          // [table_rows, table_cols] float32 rows on the device, or nullptr
  int* counter;                // device int32 step counter (with table): row and step index; decremented after
  int64_t table_rows;
  int table_cols;              // 6 (a, b, c, p, q, sigma) or 8 (plus lv0, lv1)
  float clip, guidance;
  uint64_t seed;
  uint32_t step;  // used when table == nullptr
  uint32_t sample_offset;
  int device;
  std::uintptr_t stream;  // cudaStream_t
};

struct NormalLaunch {
  float* out;
  int64_t n, d;
  uint64_t seed;
  uint32_t step, stream_id, sample_offset;
  int device;
  std::uintptr_t stream;
};

// Launch (asynchronously on `stream`) and check the launch; errors throw std::runtime_error.
void fused_step(const StepLaunch& launch);
void normal(const NormalLaunch& launch);

// Copy a host [rows, cols] table to the device buffer `table` and set *counter = rows - 1 (synchronous).
void upload_table(const float* host, int64_t rows, int64_t cols, float* table, int* counter, int device);

int device_count();
// "major.minor" compute capability and name of a device, for error messages and bench records.
void device_properties(int device, int& major, int& minor, char* name, int name_len);

}  // namespace ddpm::cuda
