// ddpm._C: the CPU extension. Never links or loads a CUDA runtime.
#include <pybind11/pybind11.h>

#include "build_info.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "ddpm CPU kernels (C++17, OpenMP)";
  m.def(
      "build_info",
      []() {
        py::dict d;
        d["compiler"] = DDPM_CXX_COMPILER;
        d["openmp"] = ddpm::have_openmp();
        d["max_threads"] = ddpm::max_threads();
        return d;
      },
      "How this module was built: compiler, OpenMP on/off, OpenMP thread count.");
}
