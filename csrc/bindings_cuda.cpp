// ddpm._C_cuda: the CUDA extension, kept apart so importing ddpm._C never needs a CUDA runtime.
#include <pybind11/pybind11.h>

#ifndef DDPM_CUDA_COMPILER
#define DDPM_CUDA_COMPILER "unknown"
#endif

namespace py = pybind11;

namespace ddpm {
int cuda_device_count();
}

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "ddpm CUDA kernels";
  m.def("device_count", &ddpm::cuda_device_count, "Visible CUDA devices (0 without a driver).");
  m.def("build_info", []() {
    py::dict d;
    d["cuda_compiler"] = DDPM_CUDA_COMPILER;
    return d;
  });
}
