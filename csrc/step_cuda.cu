// CUDA kernels of ddpm._C_cuda, in two halves: kernels, then launchers (llm.c style). The noise and the affine
// form come from philox.h / step_math.h, the same code the CPU build runs and the CPU tests check.
//
// Each thread takes one group (4 consecutive elements of a sample = one Philox block) in a grid-stride loop.
// When every sample's length is a multiple of 4 and the buffers (and the strided operands' sample starts) are
// 16-byte aligned, a group is one float4 load/store per tensor; otherwise a scalar path handles the group (and a
// sample's partial last group).
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <stdexcept>
#include <string>

#include "philox.h"
#include "step_cuda.h"
#include "step_math.h"

namespace ddpm::cuda {
namespace {

// ------------------------------------------------------------------------------------------------- kernels

struct Row {
  float a, b, c, p, q, sigma, lv0, lv1;
};

struct Geometry {
  int64_t d;                // elements per sample
  uint32_t groups;          // groups per sample, ceil(d / 4)
  uint32_t total;           // n * groups (< 2^32, checked by the launcher)
};

// The optional operands (step_cpu.h's StepArgs): nullptr when absent; strides in elements between samples.
struct Ops {
  const float* u;
  const float* v;
  const float* thr;
  int64_t m_stride, u_stride, v_stride;
  float guidance;
};

// Fused step. With `table`, the coefficient row and the step index come from the device counter (CUDA graphs:
// the graph's kernel arguments never change, the counter does); a counter outside the table writes NaN so that
// the sampling loop's finiteness check stops the run instead of reading out of bounds. Whether h is read depends
// on the row's c, known only here: a grid-uniform branch, so c == 0 never touches the old h. kOps = false is the
// kernel without optional operands (m contiguous): exactly the loop it was before they existed. With kOps, which
// operands are present is a grid-uniform branch too (the step is memory-bound; no divergence).
// No __restrict__ on x, m, out: out may be x or m (in place); each thread reads its group before writing it.
template <bool kVec, bool kOps>
__global__ void fused_step_kernel(const float* x, const float* m, float* out, float* __restrict__ h, Geometry geo,
                                  Row row, Ops ops, const float* __restrict__ table, const int* __restrict__ counter,
                                  int64_t table_rows, int table_cols, float clip, uint32_t k0, uint32_t k1,
                                  uint32_t step, uint32_t sample_offset) {
  if (table != nullptr) {
    const int i = *counter;
    if (i >= 0 && i < table_rows) {
      const float* r = table + table_cols * static_cast<int64_t>(i);
      const bool wide = table_cols == 8;
      row = Row{r[0], r[1], r[2], r[3], r[4], r[5], wide ? r[6] : 0.0f, wide ? r[7] : 0.0f};
      step = static_cast<uint32_t>(i);
    } else {
      row = Row{NAN, NAN, NAN, NAN, NAN, 0.0f, NAN, NAN};
    }
  }
  const bool noise = row.sigma != 0.0f;          // uniform across the grid: no divergence
  const bool read_h = h != nullptr && row.c != 0.0f;  // likewise
  const bool guide = kOps && ops.u != nullptr, dynamic = kOps && ops.thr != nullptr;
  const bool learned = kOps && noise && ops.v != nullptr;
  // 64-bit loop variable: g + stride must not wrap around 2^32 back into the range.
  for (uint64_t gg = blockIdx.x * blockDim.x + threadIdx.x; gg < geo.total; gg += gridDim.x * blockDim.x) {
    const uint32_t g = static_cast<uint32_t>(gg);  // < 2^32; 32-bit division is much cheaper
    const uint32_t s = g / geo.groups, c = g - s * geo.groups;
    const int64_t e = static_cast<int64_t>(s) * geo.d + 4 * static_cast<int64_t>(c);
    const int64_t col = 4 * static_cast<int64_t>(c);
    const int64_t em = kOps ? static_cast<int64_t>(s) * ops.m_stride + col : e;
    const int64_t eu = kOps ? static_cast<int64_t>(s) * ops.u_stride + col : 0;
    const int64_t ev = kOps ? static_cast<int64_t>(s) * ops.v_stride + col : 0;
    const float bound = dynamic ? ops.thr[s] : clip;
    float z[4] = {0.f, 0.f, 0.f, 0.f};
    if (noise) normal4(c, sample_offset + s, step, kStreamStep, k0, k1, z[0], z[1], z[2], z[3]);
    if constexpr (kVec) {
      // x and m (and h) are read before out (and h) are written, so out == x (in place) is fine.
      const float4 xv = *reinterpret_cast<const float4*>(x + e);
      const float4 mv = *reinterpret_cast<const float4*>(m + em);
      const float xs[4] = {xv.x, xv.y, xv.z, xv.w};
      float ms[4] = {mv.x, mv.y, mv.z, mv.w};
      float hs[4] = {0.f, 0.f, 0.f, 0.f}, sig[4] = {row.sigma, row.sigma, row.sigma, row.sigma};
      if (read_h) {
        const float4 hv = *reinterpret_cast<const float4*>(h + e);
        hs[0] = hv.x, hs[1] = hv.y, hs[2] = hv.z, hs[3] = hv.w;
      }
      if (guide) {
        const float4 uv = *reinterpret_cast<const float4*>(ops.u + eu);
        const float us[4] = {uv.x, uv.y, uv.z, uv.w};
#pragma unroll
        for (int k = 0; k < 4; ++k) ms[k] = guided(ms[k], us[k], ops.guidance);
      }
      if (learned) {
        const float4 vv = *reinterpret_cast<const float4*>(ops.v + ev);
        const float vs[4] = {vv.x, vv.y, vv.z, vv.w};
#pragma unroll
        for (int k = 0; k < 4; ++k) sig[k] = learned_sigma(vs[k], row.lv0, row.lv1);
      }
      float x0[4], o[4];
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        x0[k] = x0_hat(xs[k], ms[k], row.p, row.q, bound);
        if (dynamic) x0[k] = x0[k] / bound;
        o[k] = read_h ? affine_history(xs[k], x0[k], hs[k], z[k], row.a, row.b, row.c, sig[k])
                      : affine(xs[k], x0[k], z[k], row.a, row.b, sig[k]);
      }
      *reinterpret_cast<float4*>(out + e) = make_float4(o[0], o[1], o[2], o[3]);
      if (h != nullptr) *reinterpret_cast<float4*>(h + e) = make_float4(x0[0], x0[1], x0[2], x0[3]);
    } else {
      const int k_end = static_cast<int>(geo.d - col < 4 ? geo.d - col : 4);
      for (int k = 0; k < k_end; ++k) {
        const float xk = x[e + k];
        float mk = m[em + k];
        if (guide) mk = guided(mk, ops.u[eu + k], ops.guidance);
        float x0 = x0_hat(xk, mk, row.p, row.q, bound);
        if (dynamic) x0 = x0 / bound;
        const float sig = learned ? learned_sigma(ops.v[ev + k], row.lv0, row.lv1) : row.sigma;
        out[e + k] = read_h ? affine_history(xk, x0, h[e + k], z[k], row.a, row.b, row.c, sig)
                            : affine(xk, x0, z[k], row.a, row.b, sig);
        if (h != nullptr) h[e + k] = x0;
      }
    }
  }
}

// After the step kernel (same stream): the next replay takes the next row (the loop runs i = steps-1 .. 0).
__global__ void advance_counter_kernel(int* counter) { *counter -= 1; }

template <bool kVec>
__global__ void normal_kernel(float* out, Geometry geo, uint32_t k0, uint32_t k1, uint32_t step, uint32_t stream,
                              uint32_t sample_offset) {
  // 64-bit loop variable: g + stride must not wrap around 2^32 back into the range.
  for (uint64_t gg = blockIdx.x * blockDim.x + threadIdx.x; gg < geo.total; gg += gridDim.x * blockDim.x) {
    const uint32_t g = static_cast<uint32_t>(gg);  // < 2^32; 32-bit division is much cheaper
    const uint32_t s = g / geo.groups, c = g - s * geo.groups;
    const int64_t e = static_cast<int64_t>(s) * geo.d + 4 * static_cast<int64_t>(c);
    float z[4];
    normal4(c, sample_offset + s, step, stream, k0, k1, z[0], z[1], z[2], z[3]);
    if constexpr (kVec) {
      *reinterpret_cast<float4*>(out + e) = make_float4(z[0], z[1], z[2], z[3]);
    } else {
      const int k_end = static_cast<int>(geo.d - 4 * static_cast<int64_t>(c) < 4 ? geo.d - 4 * static_cast<int64_t>(c) : 4);
      for (int k = 0; k < k_end; ++k) out[e + k] = z[k];
    }
  }
}

// ----------------------------------------------------------------------------------------------- launchers

constexpr int kThreads = 256;

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear a non-sticky error so the next call starts clean
    throw std::runtime_error(std::string("CUDA error in ") + what + ": " + cudaGetErrorName(err) + " (" +
                             cudaGetErrorString(err) + ")");
  }
}

// Blocks for a grid-stride loop over `total` groups: enough to fill every SM a few times over, no more.
unsigned blocks_for(uint32_t total, int device) {
  static int sm_count[64] = {};  // per device, queried once (a benign race: every thread writes the same value)
  int sms = device >= 0 && device < 64 ? sm_count[device] : 0;
  if (sms == 0) {
    check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
    if (device >= 0 && device < 64) sm_count[device] = sms;
  }
  const uint64_t needed = (static_cast<uint64_t>(total) + kThreads - 1) / kThreads;
  const uint64_t cap = static_cast<uint64_t>(sms > 0 ? sms : 1) * 16;
  return static_cast<unsigned>(needed < cap ? (needed > 0 ? needed : 1) : cap);
}

Geometry geometry(int64_t n, int64_t d) {
  const int64_t groups = (d + 3) / 4;
  if (n * groups >= (int64_t{1} << 32)) {
    throw std::invalid_argument("tensor too large for the CUDA kernels: n * ceil(d / 4) must be < 2^32");
  }
  return Geometry{d, static_cast<uint32_t>(groups), static_cast<uint32_t>(n * groups)};
}

bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

template <bool kVec, bool kOps>
void launch_step(const StepLaunch& L, const Geometry& geo, const Row& row, const Ops& ops, uint32_t k0, uint32_t k1,
                 unsigned blocks, cudaStream_t stream) {
  fused_step_kernel<kVec, kOps><<<blocks, kThreads, 0, stream>>>(L.x, L.m, L.out, L.h, geo, row, ops, L.table,
                                                                 L.counter, L.table_rows, L.table_cols, L.clip, k0,
                                                                 k1, L.step, L.sample_offset);
}

}  // namespace

void fused_step(const StepLaunch& L) {
  const Geometry geo = geometry(L.n, L.d);
  if (L.table != nullptr && L.counter == nullptr) throw std::invalid_argument("a coefficient table needs a counter");
  if (L.table != nullptr && L.table_cols != 6 && L.table_cols != 8) {
    throw std::invalid_argument("a coefficient table has 6 or 8 columns");
  }
  check(cudaSetDevice(L.device), "cudaSetDevice");  // our (static) runtime keeps its own current device
  const auto stream = reinterpret_cast<cudaStream_t>(L.stream);
  // The kernel without optional operands runs whenever none is given and m is contiguous.
  const bool ops_given = L.u != nullptr || L.v != nullptr || L.thr != nullptr || L.m_stride != L.d;
  const bool vec = L.d % 4 == 0 && aligned16(L.x) && aligned16(L.m) && aligned16(L.out) &&
                   (L.h == nullptr || aligned16(L.h)) && L.m_stride % 4 == 0 &&
                   (L.u == nullptr || (aligned16(L.u) && L.u_stride % 4 == 0)) &&
                   (L.v == nullptr || (aligned16(L.v) && L.v_stride % 4 == 0));
  const Row row{L.a, L.b, L.c, L.p, L.q, L.sigma, L.lv0, L.lv1};
  const Ops ops{L.u, L.v, L.thr, L.m_stride, L.u_stride, L.v_stride, L.guidance};
  const uint32_t k0 = static_cast<uint32_t>(L.seed), k1 = static_cast<uint32_t>(L.seed >> 32);
  if (geo.total > 0) {
    const unsigned blocks = blocks_for(geo.total, L.device);
    if (vec) {
      ops_given ? launch_step<true, true>(L, geo, row, ops, k0, k1, blocks, stream)
                : launch_step<true, false>(L, geo, row, ops, k0, k1, blocks, stream);
    } else {
      ops_given ? launch_step<false, true>(L, geo, row, ops, k0, k1, blocks, stream)
                : launch_step<false, false>(L, geo, row, ops, k0, k1, blocks, stream);
    }
    check(cudaGetLastError(), "fused_step_kernel launch");
  }
  if (L.table != nullptr) {
    advance_counter_kernel<<<1, 1, 0, stream>>>(L.counter);
    check(cudaGetLastError(), "advance_counter_kernel launch");
  }
}

void normal(const NormalLaunch& L) {
  const Geometry geo = geometry(L.n, L.d);
  if (geo.total == 0) return;
  check(cudaSetDevice(L.device), "cudaSetDevice");
  const auto stream = reinterpret_cast<cudaStream_t>(L.stream);
  const uint32_t k0 = static_cast<uint32_t>(L.seed), k1 = static_cast<uint32_t>(L.seed >> 32);
  const unsigned blocks = blocks_for(geo.total, L.device);
  if (L.d % 4 == 0 && aligned16(L.out)) {
    normal_kernel<true><<<blocks, kThreads, 0, stream>>>(L.out, geo, k0, k1, L.step, L.stream_id, L.sample_offset);
  } else {
    normal_kernel<false><<<blocks, kThreads, 0, stream>>>(L.out, geo, k0, k1, L.step, L.stream_id, L.sample_offset);
  }
  check(cudaGetLastError(), "normal_kernel launch");
}

void upload_table(const float* host, int64_t rows, int64_t cols, float* table, int* counter, int device) {
  check(cudaSetDevice(device), "cudaSetDevice");
  check(cudaMemcpy(table, host, static_cast<size_t>(rows * cols) * sizeof(float), cudaMemcpyHostToDevice),
        "cudaMemcpy (coefficient table)");
  const int last = static_cast<int>(rows - 1);
  check(cudaMemcpy(counter, &last, sizeof last, cudaMemcpyHostToDevice), "cudaMemcpy (step counter)");
}

// Number of visible CUDA devices; 0 when no driver or device is present (never throws).
int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the "no driver" error
    return 0;
  }
  return n;
}

void device_properties(int device, int& major, int& minor, char* name, int name_len) {
  cudaDeviceProp prop{};
  check(cudaGetDeviceProperties(&prop, device), "cudaGetDeviceProperties");
  major = prop.major;
  minor = prop.minor;
  std::snprintf(name, static_cast<size_t>(name_len), "%s", prop.name);
}

}  // namespace ddpm::cuda
