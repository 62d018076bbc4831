// Facts about how the extension was built, shared by the CPU and CUDA bindings.
#pragma once

#ifndef DDPM_CXX_COMPILER
#define DDPM_CXX_COMPILER "unknown"
#endif

#ifdef DDPM_HAVE_OPENMP
#include <omp.h>
#endif

namespace ddpm {

inline bool have_openmp() {
#ifdef DDPM_HAVE_OPENMP
  return true;
#else
  return false;
#endif
}

inline int max_threads() {
#ifdef DDPM_HAVE_OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

}  // namespace ddpm
