// CUDA side of ddpm: device queries (kernels are added with the fused-step work).
#include <cuda_runtime.h>

namespace ddpm {

// Number of visible CUDA devices; 0 when no driver or device is present (never throws).
int cuda_device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" error
    return 0;
  }
  return n;
}

}  // namespace ddpm
