// The Python-level step arguments both bindings convert the same way: the coefficient row and the Philox counter
// words arrive as Python objects and are checked here, by name. (pybind11's own conversion would answer a
// negative seed with "incompatible function arguments", naming nothing.)
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>

#include "checks.h"

namespace ddpm {

namespace py = pybind11;

// A Python integer (or anything with __index__, such as a NumPy integer; not a bool) in [0, limit]; the message
// names the argument and the allowed range.
inline uint64_t index_arg(py::handle h, const char* name, uint64_t limit, const char* range) {
  PyObject* o = h.ptr();
  if (!PyBool_Check(o)) {
    PyObject* i = PyLong_CheckExact(o) ? (Py_INCREF(o), o) : PyNumber_Index(o);
    if (i != nullptr) {
      const unsigned long long v = PyLong_AsUnsignedLongLong(i);  // negative or too large: an OverflowError
      Py_DECREF(i);
      if (!(v == std::numeric_limits<unsigned long long>::max() && PyErr_Occurred()) && v <= limit) return v;
    }
    PyErr_Clear();
  }
  throw std::invalid_argument(std::string(name) + " must be an integer in " + range + ", got " +
                              py::repr(h).cast<std::string>());
}

inline uint64_t seed_arg(py::handle h) {
  return index_arg(h, "seed", std::numeric_limits<uint64_t>::max(), "[0, 2^64)");
}

inline uint32_t counter_word_arg(py::handle h, const char* name) {
  return static_cast<uint32_t>(index_arg(h, name, std::numeric_limits<uint32_t>::max(), "[0, 4294967296)"));
}

// A coefficient row: a sequence of six numbers (a, b, c, p, q, sigma), or eight (plus lv0, lv1 of a learned-range
// variance), each finite once cast to float32. Returns the width.
inline int coeffs_arg(py::handle h, float row[kNumCoefsLearned]) {
  bool ok = false;
  Py_ssize_t size = 0;
  if (PyObject* seq = PySequence_Fast(h.ptr(), "")) {
    size = PySequence_Fast_GET_SIZE(seq);
    ok = size == kNumCoefs || size == kNumCoefsLearned;
    for (Py_ssize_t k = 0; ok && k < size; ++k) {
      const double v = PyFloat_AsDouble(PySequence_Fast_GET_ITEM(seq, k));  // ints and __float__ too
      ok = !(v == -1.0 && PyErr_Occurred());
      row[k] = static_cast<float>(v);
    }
    Py_DECREF(seq);
  }
  if (!ok) {
    PyErr_Clear();
    throw std::invalid_argument("coeffs must be 6 floats (a, b, c, p, q, sigma) or 8 (plus lv0, lv1), got " +
                                py::repr(h).cast<std::string>());
  }
  for (Py_ssize_t k = 0; k < size; ++k) check_finite(row[k], kCoefNames[k]);
  return static_cast<int>(size);
}

// A Python float (or int, or anything with __float__); the message names the argument.
inline double float_arg(py::handle h, const char* name) {
  const double v = PyFloat_AsDouble(h.ptr());
  if (v == -1.0 && PyErr_Occurred()) {
    PyErr_Clear();
    throw std::invalid_argument(std::string(name) + " must be a float, got " + py::repr(h).cast<std::string>());
  }
  return v;
}

}  // namespace ddpm
