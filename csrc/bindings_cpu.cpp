// ddpm._C: the CPU extension. Never links or loads a CUDA runtime.
//
// Tensors cross as plain integers (data pointers) and sizes, so the module needs no libtorch and works with any
// torch version; the Python front (ddpm.runtime.kernels / ddpm.noise) checks the tensors by name before calling.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "build_info.h"
#include "checks.h"
#include "philox.h"
#include "step_cpu.h"

namespace py = pybind11;

namespace {

// Large calls release the GIL (other Python threads run meanwhile); tiny ones skip the release/re-acquire cost.
constexpr int64_t kReleaseGilElements = 1 << 14;

template <class F>
void run_maybe_without_gil(int64_t elements, F&& f) {
  if (elements >= kReleaseGilElements) {
    py::gil_scoped_release release;
    f();
  } else {
    f();
  }
}

void fused_step(std::uintptr_t x, std::uintptr_t m, std::uintptr_t out, int64_t n, int64_t d, float a, float b,
                float p, float q, float sigma, float clip, uint64_t seed, uint32_t step, uint32_t sample_offset) {
  ddpm::check_sizes(n, d, sample_offset);
  ddpm::cpu::StepArgs args{ddpm::float_ptr<const float>(x, "x"), ddpm::float_ptr<const float>(m, "m"),
                           ddpm::float_ptr<float>(out, "out"), n, d, a, b, p, q, sigma, clip, seed, step,
                           sample_offset};
  const uint64_t bytes = static_cast<uint64_t>(n * d) * sizeof(float);
  ddpm::check_no_partial_overlap(out, "out", x, "x", bytes);
  ddpm::check_no_partial_overlap(out, "out", m, "m", bytes);
  ddpm::check_finite(a, "a");
  ddpm::check_finite(b, "b");
  ddpm::check_finite(p, "p");
  ddpm::check_finite(q, "q");
  ddpm::check_finite(sigma, "sigma");
  ddpm::check_clip(clip);
  if (n == 0) return;
  run_maybe_without_gil(n * d, [&] { ddpm::cpu::fused_step(args); });
}

void normal(std::uintptr_t out, int64_t n, int64_t d, uint64_t seed, uint32_t step, uint32_t stream,
            uint32_t sample_offset) {
  ddpm::check_sizes(n, d, sample_offset);
  ddpm::cpu::NormalArgs args{ddpm::float_ptr<float>(out, "out"), n, d, seed, step, stream, sample_offset};
  if (n == 0) return;
  run_maybe_without_gil(n * d, [&] { ddpm::cpu::normal(args); });
}

// Box-Muller of given Philox words (a test hook: edge-case words such as 0, 2^31, 2^32 - 1 cannot be reached
// through a counter on purpose). words: [groups, 4] uint32, out: [groups, 4] float32.
void box_muller(std::uintptr_t words, std::uintptr_t out, int64_t groups) {
  DDPM_REQUIRE(groups >= 0, "groups must be >= 0");
  DDPM_REQUIRE(words != 0 && words % alignof(uint32_t) == 0, "words must be a non-null uint32 buffer");
  const auto* w = reinterpret_cast<const uint32_t*>(words);
  float* z = ddpm::float_ptr<float>(out, "out");
  for (int64_t g = 0; g < groups; ++g) {
    ddpm::box_muller4(w[4 * g], w[4 * g + 1], w[4 * g + 2], w[4 * g + 3], z[4 * g], z[4 * g + 1], z[4 * g + 2],
                      z[4 * g + 3]);
  }
}

// The CPU twin of the CUDA device-counter kernel: the [rows, 5] float32 coefficient table and the step counter
// live here, so one sampling step is a call with no arguments to convert (see BoundStep).
class StepTable {
 public:
  StepTable(std::uintptr_t table, int64_t rows, float clip, uint64_t seed, uint32_t sample_offset)
      : clip_(clip), seed_(seed), sample_offset_(sample_offset) {
    DDPM_REQUIRE(rows >= 1 && rows < (int64_t{1} << 31), "table rows must be in 1..2^31-1, got " + std::to_string(rows));
    const float* t = ddpm::float_ptr<const float>(table, "table");
    rows_.assign(t, t + 5 * rows);
    for (int64_t i = 0; i < 5 * rows; ++i) ddpm::check_finite(rows_[i], "in table");
    ddpm::check_clip(clip);
    counter_ = rows - 1;
  }

  int64_t rows() const { return static_cast<int64_t>(rows_.size() / 5); }
  int64_t counter() const { return counter_; }
  void set_counter(int64_t i) {
    DDPM_REQUIRE(i >= 0 && i < rows(), "step counter must be in 0.." + std::to_string(rows() - 1) + ", got " +
                                           std::to_string(i));
    counter_ = i;
  }

  // ddpm::cpu::StepArgs for row [counter] on the given buffers (checked), then counter -= 1.
  ddpm::cpu::StepArgs next(std::uintptr_t x, std::uintptr_t m, std::uintptr_t out, int64_t n, int64_t d) {
    if (counter_ < 0 || counter_ >= rows()) {
      throw py::index_error("step counter " + std::to_string(counter_) + " is outside the table 0.." +
                            std::to_string(rows() - 1) + " (more steps run than the table has?)");
    }
    const float* r = rows_.data() + 5 * counter_;
    ddpm::cpu::StepArgs args{reinterpret_cast<const float*>(x), reinterpret_cast<const float*>(m),
                             reinterpret_cast<float*>(out), n, d, r[0], r[1], r[2], r[3], r[4], clip_, seed_,
                             static_cast<uint32_t>(counter_), sample_offset_};
    --counter_;
    return args;
  }

  static void check_buffers(std::uintptr_t x, std::uintptr_t m, std::uintptr_t out, int64_t n, int64_t d,
                            uint32_t sample_offset) {
    ddpm::check_sizes(n, d, sample_offset);
    ddpm::float_ptr<const float>(x, "x");
    ddpm::float_ptr<const float>(m, "m");
    ddpm::float_ptr<float>(out, "out");
    const uint64_t bytes = static_cast<uint64_t>(n * d) * sizeof(float);
    ddpm::check_no_partial_overlap(out, "out", x, "x", bytes);
    ddpm::check_no_partial_overlap(out, "out", m, "m", bytes);
  }

  void step(std::uintptr_t x, std::uintptr_t m, std::uintptr_t out, int64_t n, int64_t d) {
    check_buffers(x, m, out, n, d, sample_offset_);
    const ddpm::cpu::StepArgs args = next(x, m, out, n, d);
    if (n > 0) run_maybe_without_gil(n * d, [&] { ddpm::cpu::fused_step(args); });
  }

  uint32_t sample_offset() const { return sample_offset_; }

 private:
  std::vector<float> rows_;
  float clip_;
  uint64_t seed_;
  uint32_t sample_offset_;
  int64_t counter_ = 0;
};

// A StepTable bound to three buffers, checked once: calling it runs the step of row [counter] and decrements
// the counter. It holds references to the Python tensors, so the buffers outlive it.
class BoundStep {
 public:
  BoundStep(std::shared_ptr<StepTable> table, py::object x, py::object m, py::object out, std::uintptr_t x_ptr,
            std::uintptr_t m_ptr, std::uintptr_t out_ptr, int64_t n, int64_t d)
      : table_(std::move(table)), x_(std::move(x)), m_(std::move(m)), out_(std::move(out)),
        x_ptr_(x_ptr), m_ptr_(m_ptr), out_ptr_(out_ptr), n_(n), d_(d) {
    StepTable::check_buffers(x_ptr, m_ptr, out_ptr, n, d, table_->sample_offset());
  }

  py::object operator()() {
    const ddpm::cpu::StepArgs args = table_->next(x_ptr_, m_ptr_, out_ptr_, n_, d_);
    if (n_ > 0) run_maybe_without_gil(n_ * d_, [&] { ddpm::cpu::fused_step(args); });
    return out_;
  }

 private:
  std::shared_ptr<StepTable> table_;
  py::object x_, m_, out_;
  std::uintptr_t x_ptr_, m_ptr_, out_ptr_;
  int64_t n_, d_;
};

std::array<uint32_t, 4> philox(std::array<uint32_t, 4> counter, std::array<uint32_t, 2> key) {
  ddpm::philox4x32_10(counter[0], counter[1], counter[2], counter[3], key[0], key[1]);
  return counter;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "ddpm CPU kernels (C++17, OpenMP, SIMD): the fused reverse step and Philox4x32-10 normals";
  m.def("fused_step", &fused_step, py::arg("x"), py::arg("m"), py::arg("out"), py::arg("n"), py::arg("d"),
        py::arg("a"), py::arg("b"), py::arg("p"), py::arg("q"), py::arg("sigma"), py::arg("clip"), py::arg("seed"),
        py::arg("step"), py::arg("sample_offset"),
        "out = a x + b clip(p x + q m, -clip, clip) + sigma z on [n, d] float32 buffers given as data pointers;\n"
        "z = the Philox normals of (seed, step, stream 0) for global samples sample_offset .. sample_offset+n-1.\n"
        "out may equal x or m (in place).");
  m.def("normal", &normal, py::arg("out"), py::arg("n"), py::arg("d"), py::arg("seed"), py::arg("step"),
        py::arg("stream"), py::arg("sample_offset"),
        "Fill the [n, d] float32 buffer at `out` with the N(0, 1) draws of (seed, step, stream).");
  m.def("philox4x32_10", &philox, py::arg("counter"), py::arg("key"),
        "One Philox4x32-10 block: 4 uint32 counter words, 2 key words -> 4 uint32 words.");
  m.def(
      "philox_words",
      [](uint32_t c0, uint32_t count, uint32_t sample, uint32_t step, uint32_t stream, uint64_t seed) {
        std::vector<uint32_t> out(4 * static_cast<size_t>(count));
        ddpm::cpu::philox_words(out.data(), c0, count, sample, step, stream, seed);
        return out;
      },
      py::arg("c0"), py::arg("count"), py::arg("sample"), py::arg("step"), py::arg("stream"), py::arg("seed"),
      "Test hook: the Philox words [count * 4] of counters (c0 + i, sample, step, stream), by the SIMD variant in use.");
  m.def("box_muller", &box_muller, py::arg("words"), py::arg("out"), py::arg("groups"),
        "Test hook: the normals of given Philox words ([groups, 4] uint32 -> [groups, 4] float32 buffers).");
  py::class_<StepTable, std::shared_ptr<StepTable>>(m, "StepTable",
                                                   "Coefficient table [rows, 5] + step counter for CPU sampling loops.")
      .def(py::init<std::uintptr_t, int64_t, float, uint64_t, uint32_t>(), py::arg("table"), py::arg("rows"),
           py::arg("clip"), py::arg("seed"), py::arg("sample_offset"))
      .def_property_readonly("rows", &StepTable::rows)
      .def_property_readonly("counter", &StepTable::counter)
      .def("set_counter", &StepTable::set_counter, py::arg("i"))
      .def("step", &StepTable::step, py::arg("x"), py::arg("m"), py::arg("out"), py::arg("n"), py::arg("d"),
           "Fused step of row [counter] (step index = counter) on the buffers, then counter -= 1.")
      .def(
          "bind",
          [](const std::shared_ptr<StepTable>& self, py::object x, py::object m, py::object out,
             std::uintptr_t x_ptr, std::uintptr_t m_ptr, std::uintptr_t out_ptr, int64_t n, int64_t d) {
            return BoundStep(self, std::move(x), std::move(m), std::move(out), x_ptr, m_ptr, out_ptr, n, d);
          },
          py::arg("x"), py::arg("m"), py::arg("out"), py::arg("x_ptr"), py::arg("m_ptr"), py::arg("out_ptr"),
          py::arg("n"), py::arg("d"));
  py::class_<BoundStep>(m, "BoundStep", "A StepTable bound to (x, m, out); call it once per step.")
      .def("__call__", &BoundStep::operator());
  m.def("parallel_threshold", &ddpm::cpu::parallel_threshold,
        "Elements (noise-weighted) below which a call runs on one thread.");
  m.def("set_parallel_threshold", &ddpm::cpu::set_parallel_threshold, py::arg("elements"));
  m.def("simd_target", &ddpm::cpu::simd_target, "The instruction set the kernels dispatch to.");
  m.def("simd_targets", &ddpm::cpu::simd_targets, "The instruction sets this CPU can run.");
  m.def("set_simd_target", &ddpm::cpu::set_simd_target, py::arg("name"),
        "Force a kernel variant (tests run each); \"\" restores the automatic choice.");
  m.def(
      "build_info",
      []() {
        py::dict d;
        d["compiler"] = DDPM_CXX_COMPILER;
        d["openmp"] = ddpm::have_openmp();
        d["max_threads"] = ddpm::max_threads();
        d["simd"] = ddpm::cpu::simd_target();
        return d;
      },
      "How this module was built: compiler, OpenMP on/off, OpenMP thread count, SIMD variant in use.");
}
