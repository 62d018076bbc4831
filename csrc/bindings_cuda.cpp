// ddpm._C_cuda: the CUDA extension, kept apart so importing ddpm._C never needs a CUDA runtime.
//
// Like ddpm._C, it takes data pointers, sizes, the device index and the cudaStream_t as plain integers (no
// libtorch link), and checks all of them here (the Python front checks only tensors). One step entry, fused_step:
// the coefficient row by value, or a DeviceTable read at its device counter, with the optional operands of
// ddpm._C.fused_step as keywords (dynamic thresholds are computed by the Python front with torch ops on CUDA). The CUDA runtime is linked
// statically; it keeps its own "current device", so every launch names its device explicitly.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "checks.h"
#include "py_args.h"
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

// A [rows, 6] or [rows, 8] float32 coefficient table and an int32 step counter in device memory (buffers the Python
// front allocates and keeps alive): the constructor checks the host rows, uploads them and sets the counter to
// rows - 1. The kernel reads row [*counter] and decrements it, so one captured CUDA graph replays every step.
class DeviceTable {
 public:
  DeviceTable(std::uintptr_t host_table, int64_t rows, std::uintptr_t table, std::uintptr_t counter, int device,
              int64_t cols)
      : table_(ddpm::float_ptr<float>(table, "table")), rows_(rows), cols_(cols), device_(device) {
    const float* host = ddpm::float_ptr<const float>(host_table, "host_table");
    ddpm::check_table(host, rows, cols);
    for (int64_t i = 0; i < rows; ++i) needs_history_ = needs_history_ || host[cols * i + 2] != 0.0f;
    DDPM_REQUIRE(counter != 0 && counter % alignof(int) == 0, "counter must be a non-null, 4-byte aligned int32 pointer");
    counter_ = reinterpret_cast<int*>(counter);
    check_device(device);
    ddpm::cuda::upload_table(host, rows, cols, table_, counter_, device);
  }

  int64_t rows() const { return rows_; }
  int64_t cols() const { return cols_; }
  float* table() const { return table_; }
  int* counter() const { return counter_; }
  int device() const { return device_; }
  bool needs_history() const { return needs_history_; }  // some row has c != 0

 private:
  float* table_;
  int* counter_ = nullptr;
  int64_t rows_, cols_;
  int device_;
  bool needs_history_ = false;
};

void fused_step(std::uintptr_t x, std::uintptr_t m, std::uintptr_t out, int64_t n, int64_t d, py::handle coeffs,
                float clip, py::handle seed, py::handle step, py::handle sample_offset, std::uintptr_t history,
                int device, std::uintptr_t stream, int64_t m_stride, std::uintptr_t variance, int64_t variance_stride,
                std::uintptr_t uncond, int64_t uncond_stride, double guidance, std::uintptr_t thresholds) {
  ddpm::cuda::StepLaunch L{};
  L.sample_offset = ddpm::counter_word_arg(sample_offset, "sample_offset");
  ddpm::check_sizes(n, d, L.sample_offset);
  L.x = ddpm::float_ptr<const float>(x, "x");
  L.m = ddpm::float_ptr<const float>(m, "m");
  L.out = ddpm::float_ptr<float>(out, "out");
  L.h = ddpm::optional_float_ptr<float>(history, "history");
  L.u = ddpm::optional_float_ptr<const float>(uncond, "uncond");
  L.v = ddpm::optional_float_ptr<const float>(variance, "variance");
  L.thr = ddpm::optional_float_ptr<const float>(thresholds, "thresholds");
  L.n = n, L.d = d;
  L.m_stride = ddpm::check_stride(m_stride, n, d, "m_stride");
  L.u_stride = ddpm::check_stride(uncond_stride, n, d, "uncond_stride");
  L.v_stride = ddpm::check_stride(variance_stride, n, d, "variance_stride");
  const uint64_t bytes = static_cast<uint64_t>(n * d) * sizeof(float);
  ddpm::check_operand_overlaps({x, m, out, history, uncond, variance, thresholds, bytes,
                                ddpm::span_bytes(n, d, L.m_stride), ddpm::span_bytes(n, d, L.u_stride),
                                ddpm::span_bytes(n, d, L.v_stride), static_cast<uint64_t>(n) * sizeof(float),
                                L.m_stride == d});
  ddpm::check_clip(clip);
  ddpm::check_thresholds_clip(clip, L.thr != nullptr);
  L.clip = clip;
  ddpm::check_guidance(guidance, L.u != nullptr);
  L.guidance = static_cast<float>(guidance);
  L.seed = ddpm::seed_arg(seed);
  check_device(device);
  L.device = device;
  L.stream = stream;
  if (py::isinstance<DeviceTable>(coeffs)) {
    const auto* t = coeffs.cast<const DeviceTable*>();
    DDPM_REQUIRE(step.is_none(), "step must be None with a DeviceTable (the device counter is the step index)");
    DDPM_REQUIRE(t->device() == device, "the DeviceTable is on device " + std::to_string(t->device()) +
                                            " but the buffers are on device " + std::to_string(device));
    ddpm::check_variance(t->cols(), L.v != nullptr);
    L.table = t->table();
    L.counter = t->counter();
    L.table_rows = t->rows();
    L.table_cols = static_cast<int>(t->cols());
    DDPM_REQUIRE(!t->needs_history() || history != 0,
                 "the DeviceTable has rows with c != 0: they need a history buffer (the previous x0_hat)");
  } else {
    float row[ddpm::kNumCoefsLearned] = {};
    const int cols = ddpm::coeffs_arg(coeffs, row);
    ddpm::check_variance(cols, L.v != nullptr);
    L.a = row[0], L.b = row[1], L.c = row[2], L.p = row[3], L.q = row[4], L.sigma = row[5];
    L.lv0 = row[6], L.lv1 = row[7];
    L.step = ddpm::counter_word_arg(step, "step");
    ddpm::check_history(L.c, history != 0);
  }
  ddpm::cuda::fused_step(L);
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
        py::arg("coeffs"), py::arg("clip"), py::arg("seed"), py::arg("step"), py::arg("sample_offset"),
        py::arg("history"), py::arg("device"), py::arg("stream"), py::kw_only(), py::arg("m_stride") = 0,
        py::arg("variance") = 0, py::arg("variance_stride") = 0, py::arg("uncond") = 0, py::arg("uncond_stride") = 0,
        py::arg("guidance") = 1.0, py::arg("thresholds") = 0,
        "As ddpm._C.fused_step, on device buffers, launched asynchronously on `stream` (a cudaStream_t).\n"
        "coeffs: the row (a, b, c, p, q, sigma[, lv0, lv1]) with Philox step index `step`; or a DeviceTable with\n"
        "step=None: row i = *counter, step index i, then *counter -= 1 on the device (replay one captured graph per\n"
        "step). The optional operands (uncond/guidance, thresholds, variance, strides) as in ddpm._C.fused_step.");
  py::class_<DeviceTable>(m, "DeviceTable",
                          "A [rows, 6] or [rows, 8] coefficient table + int32 step counter in device memory.")
      .def(py::init<std::uintptr_t, int64_t, std::uintptr_t, std::uintptr_t, int, int64_t>(), py::arg("host_table"),
           py::arg("rows"), py::arg("table"), py::arg("counter"), py::arg("device"), py::arg("cols") = 6)
      .def_property_readonly("rows", &DeviceTable::rows)
      .def_property_readonly("cols", &DeviceTable::cols);
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
