// ddpm._C_cuda: the CUDA extension, kept apart so importing ddpm._C never needs a CUDA runtime.
//
// Like ddpm._C, it takes data pointers, sizes, the device index and the cudaStream_t as plain integers (no
// libtorch link). The CUDA runtime is linked statically; it keeps its own "current device", so every launch
// names its device explicitly.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "checks.h"
#include "step_cuda.h"

#ifndef DDPM_CUDA_COMPILER
#define DDPM_CUDA_COMPILER "unknown"
#endif

namespace py = pybind11;

namespace {

void check_device(int device) {
  const int count = ddpm::cuda::device_count();
  DDPM_REQUIRE(device >= 0 && device < count,
                "device must be a visible CUDA device index 0.." + std::to_string(count - 1) + ", got " +
                    std::to_string(device));
}

void fused_step(std::uintptr_t x, std::uintptr_t m, std::uintptr_t out, int64_t n, int64_t d, float a, float b,
                float p, float q, float sigma, float clip, uint64_t seed, uint32_t step, uint32_t sample_offset,
                int device, std::uintptr_t stream) {
  ddpm::check_sizes(n, d, sample_offset);
  const uint64_t bytes = static_cast<uint64_t>(n * d) * sizeof(float);
  ddpm::check_no_partial_overlap(out, "out", x, "x", bytes);
  ddpm::check_no_partial_overlap(out, "out", m, "m", bytes);
  ddpm::check_finite(a, "a");
  ddpm::check_finite(b, "b");
  ddpm::check_finite(p, "p");
  ddpm::check_finite(q, "q");
  ddpm::check_finite(sigma, "sigma");
  ddpm::check_clip(clip);
  check_device(device);
  ddpm::cuda::StepLaunch launch{ddpm::float_ptr<const float>(x, "x"), ddpm::float_ptr<const float>(m, "m"),
                                ddpm::float_ptr<float>(out, "out"), n, d, a, b, p, q, sigma, nullptr, nullptr, 0,
                                clip, seed, step, sample_offset, device, stream};
  ddpm::cuda::fused_step(launch);
}

void fused_step_table(std::uintptr_t x, std::uintptr_t m, std::uintptr_t out, int64_t n, int64_t d,
                      std::uintptr_t table, int64_t table_rows, std::uintptr_t counter, float clip, uint64_t seed,
                      uint32_t sample_offset, int device, std::uintptr_t stream) {
  ddpm::check_sizes(n, d, sample_offset);
  const uint64_t bytes = static_cast<uint64_t>(n * d) * sizeof(float);
  ddpm::check_no_partial_overlap(out, "out", x, "x", bytes);
  ddpm::check_no_partial_overlap(out, "out", m, "m", bytes);
  ddpm::check_clip(clip);
  DDPM_REQUIRE(table_rows >= 1 && table_rows <= (int64_t{1} << 31) - 1,
                "table_rows must be in 1..2^31-1, got " + std::to_string(table_rows));
  DDPM_REQUIRE(counter != 0 && counter % alignof(int) == 0, "counter must be a non-null, 4-byte aligned int32 pointer");
  check_device(device);
  ddpm::cuda::StepLaunch launch{ddpm::float_ptr<const float>(x, "x"),
                                ddpm::float_ptr<const float>(m, "m"),
                                ddpm::float_ptr<float>(out, "out"),
                                n,
                                d,
                                0.f, 0.f, 0.f, 0.f, 0.f,
                                ddpm::float_ptr<const float>(table, "table"),
                                reinterpret_cast<int*>(counter),
                                table_rows,
                                clip,
                                seed,
                                0u,
                                sample_offset,
                                device,
                                stream};
  ddpm::cuda::fused_step(launch);
}

void normal(std::uintptr_t out, int64_t n, int64_t d, uint64_t seed, uint32_t step, uint32_t stream_id,
            uint32_t sample_offset, int device, std::uintptr_t stream) {
  ddpm::check_sizes(n, d, sample_offset);
  check_device(device);
  ddpm::cuda::NormalLaunch launch{ddpm::float_ptr<float>(out, "out"), n, d, seed, step, stream_id, sample_offset,
                                  device, stream};
  ddpm::cuda::normal(launch);
}

}  // namespace

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "ddpm CUDA kernels: the fused reverse step (also from a device coefficient table) and Philox normals";
  m.def("fused_step", &fused_step, py::arg("x"), py::arg("m"), py::arg("out"), py::arg("n"), py::arg("d"),
        py::arg("a"), py::arg("b"), py::arg("p"), py::arg("q"), py::arg("sigma"), py::arg("clip"), py::arg("seed"),
        py::arg("step"), py::arg("sample_offset"), py::arg("device"), py::arg("stream"),
        "As ddpm._C.fused_step, on device buffers, launched asynchronously on `stream` (a cudaStream_t).");
  m.def("fused_step_table", &fused_step_table, py::arg("x"), py::arg("m"), py::arg("out"), py::arg("n"),
        py::arg("d"), py::arg("table"), py::arg("table_rows"), py::arg("counter"), py::arg("clip"), py::arg("seed"),
        py::arg("sample_offset"), py::arg("device"), py::arg("stream"),
        "Fused step with row i = *counter of the device table [table_rows, 5] as (a, b, p, q, sigma) and step\n"
        "index i; then decrements *counter. Capture it once in a CUDA graph and replay it for every step.");
  m.def("normal", &normal, py::arg("out"), py::arg("n"), py::arg("d"), py::arg("seed"), py::arg("step"),
        py::arg("stream_id"), py::arg("sample_offset"), py::arg("device"), py::arg("stream"),
        "Fill the [n, d] float32 device buffer with the N(0, 1) draws of (seed, step, stream_id).");
  m.def("device_count", &ddpm::cuda::device_count, "Visible CUDA devices (0 without a driver).");
  m.def("device_properties", [](int device) {
    int major = 0, minor = 0;
    char name[256];
    ddpm::cuda::device_properties(device, major, minor, name, sizeof name);
    py::dict d;
    d["name"] = std::string(name);
    d["compute_capability"] = std::to_string(major) + "." + std::to_string(minor);
    return d;
  });
  m.def("build_info", []() {
    py::dict d;
    d["cuda_compiler"] = DDPM_CUDA_COMPILER;
    return d;
  });
}
