// ddpm._C: the CPU extension. Never links or loads a CUDA runtime.
//
// Tensors cross as plain integers (data pointers) and sizes, so the module needs no libtorch and works with any
// torch version. The Python front (ddpm.kernels, ddpm.noise) checks the tensors; everything else is checked
// here (checks.h, py_args.h). One step entry, fused_step: the coefficient row by value, or a StepTable read at an
// explicit row or at its step counter; BoundStep is that same call with its arguments checked once and kept.
// dynamic_thresholds is the first pass of a dynamically thresholded step (the per-sample bounds it reads).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstdint>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "build_info.h"
#include "checks.h"
#include "philox.h"
#include "py_args.h"
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

// The [rows, 6] or [rows, 8] float32 coefficient table (a, b, c, p, q, sigma[, lv0, lv1]) and a step counter: the
// CPU twin of the CUDA device table. The rows are copied in and checked once, so calls that read them check
// nothing per step.
class StepTable {
 public:
  StepTable(std::uintptr_t table, int64_t rows, int64_t cols) : cols_(cols) {
    const float* t = ddpm::float_ptr<const float>(table, "table");
    ddpm::check_table(t, rows, cols);
    rows_.assign(t, t + cols * rows);
    counter_ = rows - 1;
  }

  int64_t rows() const { return static_cast<int64_t>(rows_.size()) / cols_; }
  int64_t cols() const { return cols_; }
  int64_t counter() const { return counter_; }
  void set_counter(int64_t i) {
    DDPM_REQUIRE(i >= 0 && i < rows(), "step counter must be in 0.." + std::to_string(rows() - 1) + ", got " +
                                           std::to_string(i));
    counter_ = i;
  }

  // Copy row `step` (step = the schedule index i) into args, with its step index.
  void load_row(int64_t step, ddpm::cpu::StepArgs& args) const {
    DDPM_REQUIRE(step >= 0 && step < rows(), "step index i must be an integer in 0.." + std::to_string(rows() - 1) +
                                                 ", got " + std::to_string(step));
    const float* r = rows_.data() + cols_ * step;
    args.a = r[0], args.b = r[1], args.c = r[2], args.p = r[3], args.q = r[4], args.sigma = r[5];
    if (cols_ == ddpm::kNumCoefsLearned) args.lv0 = r[6], args.lv1 = r[7];
    args.step = static_cast<uint32_t>(step);
  }

  // The counter's row, then counter -= 1 (a sampling loop runs i = steps-1 .. 0).
  void load_counter_row(ddpm::cpu::StepArgs& args) {
    if (counter_ < 0 || counter_ >= rows()) {
      throw py::index_error("step counter " + std::to_string(counter_) + " is outside the table 0.." +
                            std::to_string(rows() - 1) + " (more steps run than the table has?)");
    }
    load_row(counter_--, args);
  }

 private:
  std::vector<float> rows_;
  int64_t cols_;
  int64_t counter_ = 0;
};

// The optional operands of a step as the Python front hands them (docs/design.md, "Operands of the step"):
// addresses (0 = absent), per-sample strides in elements (0 = d), and the guidance scale.
struct Operands {
  std::uintptr_t variance = 0, uncond = 0, thresholds = 0;
  int64_t m_stride = 0, variance_stride = 0, uncond_stride = 0;
  double guidance = 1.0;
};

// One checked call of the fused step. Where the row comes from: `args` itself (by value), row `args.step` of
// `table`, or the table's counter (use_counter).
struct StepCall {
  ddpm::cpu::StepArgs args{};
  StepTable* table = nullptr;
  bool use_counter = false;
};

StepCall make_call(std::uintptr_t x, std::uintptr_t m, std::uintptr_t out, int64_t n, int64_t d, py::handle coeffs,
                   float clip, py::handle seed, py::handle step, py::handle sample_offset, std::uintptr_t history,
                   const Operands& ops = Operands{}) {
  StepCall call;
  ddpm::cpu::StepArgs& A = call.args;
  A.sample_offset = ddpm::counter_word_arg(sample_offset, "sample_offset");
  ddpm::check_sizes(n, d, A.sample_offset);
  A.x = ddpm::float_ptr<const float>(x, "x");
  A.m = ddpm::float_ptr<const float>(m, "m");
  A.out = ddpm::float_ptr<float>(out, "out");
  A.h = ddpm::optional_float_ptr<float>(history, "history");
  A.u = ddpm::optional_float_ptr<const float>(ops.uncond, "uncond");
  A.v = ddpm::optional_float_ptr<const float>(ops.variance, "variance");
  A.thr = ddpm::optional_float_ptr<const float>(ops.thresholds, "thresholds");
  A.n = n, A.d = d;
  const uint64_t bytes = static_cast<uint64_t>(n * d) * sizeof(float);
  const bool plain = ops.uncond == 0 && ops.variance == 0 && ops.thresholds == 0 && ops.m_stride == 0 &&
                     ops.guidance == 1.0;
  if (plain) {  // the sampling loop's every step: only what the step without optional operands needs checked
    A.m_stride = A.u_stride = A.v_stride = d;
    ddpm::check_no_partial_overlap(out, "out", x, "x", bytes);
    ddpm::check_no_partial_overlap(out, "out", m, "m", bytes);
    if (history != 0) {
      ddpm::check_disjoint(history, "history", x, "x", bytes);
      ddpm::check_disjoint(history, "history", m, "m", bytes);
      ddpm::check_disjoint(history, "history", out, "out", bytes);
    }
  } else {
    A.m_stride = ddpm::check_stride(ops.m_stride, n, d, "m_stride");
    A.u_stride = ddpm::check_stride(ops.uncond_stride, n, d, "uncond_stride");
    A.v_stride = ddpm::check_stride(ops.variance_stride, n, d, "variance_stride");
    ddpm::check_operand_overlaps({x, m, out, history, ops.uncond, ops.variance, ops.thresholds, bytes,
                                  ddpm::span_bytes(n, d, A.m_stride), ddpm::span_bytes(n, d, A.u_stride),
                                  ddpm::span_bytes(n, d, A.v_stride), static_cast<uint64_t>(n) * sizeof(float),
                                  A.m_stride == d});
    ddpm::check_guidance(ops.guidance, A.u != nullptr);
  }
  ddpm::check_clip(clip);
  ddpm::check_thresholds_clip(clip, A.thr != nullptr);
  A.clip = clip;
  A.guidance = static_cast<float>(ops.guidance);
  A.seed = ddpm::seed_arg(seed);
  if (py::isinstance<StepTable>(coeffs)) {
    call.table = coeffs.cast<StepTable*>();
    ddpm::check_variance(call.table->cols(), A.v != nullptr);
    call.use_counter = step.is_none();
    if (!call.use_counter) {
      const uint64_t i = ddpm::index_arg(step, "step index i", std::numeric_limits<uint32_t>::max(), "[0, 2^32)");
      call.table->load_row(static_cast<int64_t>(i), A);  // checks i < rows
    }
  } else {
    float row[ddpm::kNumCoefsLearned] = {};
    const int cols = ddpm::coeffs_arg(coeffs, row);
    ddpm::check_variance(cols, A.v != nullptr);
    A.a = row[0], A.b = row[1], A.c = row[2], A.p = row[3], A.q = row[4], A.sigma = row[5];
    A.lv0 = row[6], A.lv1 = row[7];
    A.step = ddpm::counter_word_arg(step, "step");
  }
  return call;
}

// Run a checked call: take the counter's row if it reads one, then compute (without the GIL when large).
void run(StepCall& call) {
  ddpm::cpu::StepArgs args = call.args;
  if (call.use_counter) call.table->load_counter_row(args);
  ddpm::check_history(args.c, args.h != nullptr);
  if (args.n > 0) run_maybe_without_gil(args.n * args.d, [&] { ddpm::cpu::fused_step(args); });
}

// fused_step(x, m, out, n, d, coeffs, clip, seed, step, sample_offset[, history]), positional only, as a
// METH_FASTCALL function: pybind11's generic dispatcher spends ~0.25 us on eleven arguments, a fifth of a whole
// 1x1x28x28 step; converting them here costs a few tens of ns. Errors map as pybind11's would (ValueError,
// IndexError, the pending Python error).
template <class Int>
Int int_arg(PyObject* o, const char* name) {
  const long long v = PyLong_AsLongLong(o);
  if (v == -1 && PyErr_Occurred()) {
    PyErr_Clear();
    throw std::invalid_argument(std::string(name) + " must be an integer, got " +
                                py::repr(py::handle(o)).cast<std::string>());
  }
  return static_cast<Int>(v);
}

// The keyword-only optional operands, by name (values as fused_step's keywords carry them).
void operand_kwarg(Operands& ops, const char* name, PyObject* value) {
  const std::string key(name);
  if (key == "guidance") {
    ops.guidance = ddpm::float_arg(py::handle(value), "guidance");
  } else if (key == "variance") {
    ops.variance = int_arg<std::uintptr_t>(value, "variance");
  } else if (key == "uncond") {
    ops.uncond = int_arg<std::uintptr_t>(value, "uncond");
  } else if (key == "thresholds") {
    ops.thresholds = int_arg<std::uintptr_t>(value, "thresholds");
  } else if (key == "m_stride") {
    ops.m_stride = int_arg<int64_t>(value, "m_stride");
  } else if (key == "variance_stride") {
    ops.variance_stride = int_arg<int64_t>(value, "variance_stride");
  } else if (key == "uncond_stride") {
    ops.uncond_stride = int_arg<int64_t>(value, "uncond_stride");
  } else {
    throw std::invalid_argument("fused_step got an unexpected keyword argument '" + key + "'");
  }
}

PyObject* fused_step(PyObject*, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames) {
  try {
    DDPM_REQUIRE(nargs == 10 || nargs == 11,
                 "fused_step takes 10 or 11 positional arguments (x, m, out, n, d, coeffs, clip, seed, step, "
                 "sample_offset[, history]), got " + std::to_string(nargs));
    const double clip = PyFloat_AsDouble(args[6]);
    if (clip == -1.0 && PyErr_Occurred()) {
      PyErr_Clear();
      throw std::invalid_argument("clip must be a float, got " + py::repr(py::handle(args[6])).cast<std::string>());
    }
    Operands ops;
    if (kwnames != nullptr) {
      for (Py_ssize_t k = 0; k < PyTuple_GET_SIZE(kwnames); ++k) {
        operand_kwarg(ops, PyUnicode_AsUTF8(PyTuple_GET_ITEM(kwnames, k)), args[nargs + k]);
      }
    }
    StepCall call = make_call(int_arg<std::uintptr_t>(args[0], "x"), int_arg<std::uintptr_t>(args[1], "m"),
                              int_arg<std::uintptr_t>(args[2], "out"), int_arg<int64_t>(args[3], "n"),
                              int_arg<int64_t>(args[4], "d"), args[5], static_cast<float>(clip), args[7], args[8],
                              args[9], nargs == 11 ? int_arg<std::uintptr_t>(args[10], "history") : 0, ops);
    run(call);
    Py_RETURN_NONE;
  } catch (py::error_already_set& e) {
    e.restore();
  } catch (const py::builtin_exception& e) {
    e.set_error();
  } catch (const std::invalid_argument& e) {
    PyErr_SetString(PyExc_ValueError, e.what());
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
  }
  return nullptr;
}

constexpr const char* kFusedStepDoc =
    "fused_step(x, m, out, n, d, coeffs, clip, seed, step, sample_offset, history=0, /, *, m_stride=0,\n"
    "           variance=0, variance_stride=0, uncond=0, uncond_stride=0, guidance=1.0, thresholds=0)\n\n"
    "out = a x + b x0 + c h + sigma z, x0 = clip(p x + q m, -clip, clip), on [n, d] float32 buffers given as\n"
    "data pointers; z = the Philox normals of (seed, step, stream 0) for global samples sample_offset + row.\n"
    "coeffs: the row (a, b, c, p, q, sigma[, lv0, lv1]) with Philox step index `step`; or a StepTable: its row\n"
    "`step`, or with step=None its counter's row (step index = counter), then counter -= 1.\n"
    "history: 0, or an [n, d] buffer h: c h is added (never read when c == 0), then h <- x0.\n"
    "out may equal x or m (in place); history must overlap none of them.\n"
    "Optional operands (0 = absent; strides in elements between samples, 0 = d): uncond u: m -> u + guidance\n"
    "(m - u); thresholds [n]: x0 = clamp(p x + q m, -s, s) / s per sample (clip must be +inf); variance v (needs\n"
    "an 8-wide row): sigma -> exp(lv0 + lv1 v) where sigma != 0. m, uncond and variance may be strided.";

PyMethodDef kFusedStepDef = {"fused_step", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(fused_step)),
                             METH_FASTCALL | METH_KEYWORDS, kFusedStepDoc};

// fused_step's arguments, checked once and kept: each call runs the step again (with the table's counter, the
// next row). Holds `keep_alive` (the tensors behind the pointers) and the table; a call returns `returns`.
class BoundStep {
 public:
  BoundStep(std::uintptr_t x, std::uintptr_t m, std::uintptr_t out, int64_t n, int64_t d, py::object coeffs,
            float clip, py::handle seed, py::handle step, py::handle sample_offset, std::uintptr_t history,
            py::object returns, py::object keep_alive, const Operands& ops)
      : call_(make_call(x, m, out, n, d, coeffs, clip, seed, step, sample_offset, history, ops)),
        coeffs_(std::move(coeffs)), returns_(std::move(returns)), keep_alive_(std::move(keep_alive)) {}

  py::object operator()() {
    run(call_);
    return returns_;
  }

 private:
  StepCall call_;
  py::object coeffs_, returns_, keep_alive_;
};

// Per-sample dynamic thresholds (step_cpu.h, ThresholdArgs) into the [n] float32 buffer `out`.
void dynamic_thresholds(std::uintptr_t x, std::uintptr_t m, std::uintptr_t out, int64_t n, int64_t d, float p,
                        float q, double ratio, double max_value, int64_t m_stride, std::uintptr_t uncond,
                        int64_t uncond_stride, double guidance) {
  ddpm::check_sizes(n, d, 0);
  ddpm::cpu::ThresholdArgs A{};
  A.x = ddpm::float_ptr<const float>(x, "x");
  A.m = ddpm::float_ptr<const float>(m, "m");
  A.u = ddpm::optional_float_ptr<const float>(uncond, "uncond");
  A.out = ddpm::float_ptr<float>(out, "out");
  A.n = n, A.d = d;
  A.m_stride = ddpm::check_stride(m_stride, n, d, "m_stride");
  A.u_stride = ddpm::check_stride(uncond_stride, n, d, "uncond_stride");
  const uint64_t out_bytes = static_cast<uint64_t>(n) * sizeof(float);
  const std::uintptr_t reads[] = {x, m, uncond};
  const uint64_t read_bytes[] = {static_cast<uint64_t>(n * d) * sizeof(float), ddpm::span_bytes(n, d, A.m_stride),
                                 ddpm::span_bytes(n, d, A.u_stride)};
  const char* names[] = {"x", "m", "uncond"};
  for (int k = 0; k < 3; ++k) {
    DDPM_REQUIRE(!ddpm::spans_overlap(out, out_bytes, reads[k], read_bytes[k]),
                 std::string("out (the thresholds) must not overlap ") + names[k]);
  }
  ddpm::check_finite(p, "p");
  ddpm::check_finite(q, "q");
  ddpm::check_guidance(guidance, A.u != nullptr);
  ddpm::check_dynamic(ratio, max_value);
  A.p = p, A.q = q, A.guidance = static_cast<float>(guidance);
  A.ratio = static_cast<float>(ratio), A.max_value = static_cast<float>(max_value);
  if (n > 0) run_maybe_without_gil(n * d, [&] { ddpm::cpu::dynamic_thresholds(A); });
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

std::array<uint32_t, 4> philox(std::array<uint32_t, 4> counter, std::array<uint32_t, 2> key) {
  ddpm::philox4x32_10(counter[0], counter[1], counter[2], counter[3], key[0], key[1]);
  return counter;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "ddpm CPU kernels (C++17, OpenMP, SIMD): the fused reverse step and Philox4x32-10 normals";
  m.add_object("fused_step", py::reinterpret_steal<py::object>(PyCFunction_NewEx(&kFusedStepDef, nullptr, nullptr)));
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
  py::class_<StepTable>(m, "StepTable",
                        "A [rows, 6] or [rows, 8] float32 coefficient table (copied, checked) + a step counter.")
      .def(py::init<std::uintptr_t, int64_t, int64_t>(), py::arg("table"), py::arg("rows"), py::arg("cols") = 6)
      .def_property_readonly("rows", &StepTable::rows)
      .def_property_readonly("cols", &StepTable::cols)
      .def_property_readonly("counter", &StepTable::counter)
      .def("set_counter", &StepTable::set_counter, py::arg("i"));
  py::class_<BoundStep>(m, "BoundStep", "fused_step's arguments, checked once; call it to run the step again.")
      .def(py::init([](std::uintptr_t x, std::uintptr_t m, std::uintptr_t out, int64_t n, int64_t d, py::object coeffs,
                       float clip, py::handle seed, py::handle step, py::handle sample_offset, std::uintptr_t history,
                       py::object returns, py::object keep_alive, int64_t m_stride, std::uintptr_t variance,
                       int64_t variance_stride, std::uintptr_t uncond, int64_t uncond_stride, double guidance,
                       std::uintptr_t thresholds) {
             const Operands ops{variance, uncond, thresholds, m_stride, variance_stride, uncond_stride, guidance};
             return new BoundStep(x, m, out, n, d, std::move(coeffs), clip, seed, step, sample_offset, history,
                                  std::move(returns), std::move(keep_alive), ops);
           }),
           py::arg("x"), py::arg("m"), py::arg("out"), py::arg("n"), py::arg("d"), py::arg("coeffs"), py::arg("clip"),
           py::arg("seed"), py::arg("step"), py::arg("sample_offset"), py::arg("history") = 0, py::kw_only(),
           py::arg("returns") = py::none(), py::arg("keep_alive") = py::none(), py::arg("m_stride") = 0,
           py::arg("variance") = 0, py::arg("variance_stride") = 0, py::arg("uncond") = 0,
           py::arg("uncond_stride") = 0, py::arg("guidance") = 1.0, py::arg("thresholds") = 0)
      .def("__call__", &BoundStep::operator(), "Run the step; returns `returns`.");
  m.def("dynamic_thresholds", &dynamic_thresholds, py::arg("x"), py::arg("m"), py::arg("out"), py::arg("n"),
        py::arg("d"), py::arg("p"), py::arg("q"), py::arg("ratio"), py::arg("max_value"), py::kw_only(),
        py::arg("m_stride") = 0, py::arg("uncond") = 0, py::arg("uncond_stride") = 0, py::arg("guidance") = 1.0,
        "out[k] = clamp(quantile(|p x_k + q m_k|, ratio), 1, max_value) per sample k (torch.quantile's linear\n"
        "interpolation; m guided as u + guidance (m - u) when uncond is given); out is an [n] float32 buffer.");
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
