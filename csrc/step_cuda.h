// CUDA kernels of ddpm._C_cuda: the fused reverse step (by-value coefficients, or a device table row at a device
// step counter for CUDA graphs) and the noise generator. Declarations only: no CUDA headers, so the pybind11
// bindings compile as plain C++.
#pragma once

#include <cstdint>

namespace ddpm::cuda {

struct StepLaunch {
  const float* x;
  const float* m;
  float* out;
  int64_t n, d;
  float a, b, p, q, sigma;  // used when table == nullptr
  const float* table;       // [table_rows, 5] float32 (a, b, p, q, sigma) on the device, or nullptr
  int* counter;             // device int32 step counter (with table): row and step index; decremented after
  int64_t table_rows;
  float clip;
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

int device_count();
// "major.minor" compute capability and name of a device, for error messages and bench records.
void device_properties(int device, int& major, int& minor, char* name, int name_len);

}  // namespace ddpm::cuda
