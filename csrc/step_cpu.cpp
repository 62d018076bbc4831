// CPU kernels: the fused reverse step and the noise generator, one pass over memory, OpenMP + SIMD.
//
// Work is cut into "groups": group c of sample `row` covers elements 4c .. 4c+3 of that sample and is exactly one
// Philox block (counter word 0 = c), so groups are independent and threads split the flat group range
// [0, n * ceil(d / 4)) without changing a single output bit. A noisy step runs per tile of kTile groups:
//   1. the tile's Philox words, SIMD across groups (philox_simd.h: intrinsics on x86 AVX2/AVX-512, the scalar
//      philox.h round under `omp simd` elsewhere);
//   2. Box-Muller (philox.h's polynomials), a `#pragma omp simd` loop across groups that the compiler
//      vectorises, writing the tile's z in element order (one 4-way interleave, on the store);
//   3. affine_run: a contiguous `#pragma omp simd` loop over the tile's elements: out = a x + b x0 [+ c h] + sigma z
//      (and h <- x0 when a history buffer is given).
// GCC reports loops 2 and 3 vectorised with 64/32/16-byte vectors in the AVX-512/AVX2/baseline variants (build
// with -DDDPM_VEC_REPORT=ON). A sample's last, partial group (d not a multiple of 4) is one scalar Philox call.
// Steps with sigma = 0 draw no noise at all. The history operand is a template parameter too, so the DDPM/DDIM loop
// (no h) compiles to exactly the loop it was before h existed, and c == 0 with h only adds the store of x0. The
// optional operands (guidance's uncond, per-sample thresholds, the learned-range variance) are template bits the
// same way (kOps): the instantiation without them is the loop it was before they existed. A tile never crosses a
// sample, so a sample's threshold and its strided operand rows are loop-invariant scalars and pointers.
//
// The range functions are compiled three times with different target attributes (x86-64-v4 with 512-bit
// vectors, x86-64-v3 = AVX2 + FMA, and the baseline) and picked once at run time from the CPU's features, so one
// build is both portable and fast wherever it runs.
#include "step_cpu.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstddef>
#include <limits>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "philox.h"
#include "philox_simd.h"  // also defines DDPM_X86_DISPATCH
#include "step_math.h"

#ifdef DDPM_HAVE_OPENMP
#include <omp.h>
#endif

namespace ddpm::cpu {
namespace {

// ~16k noisy elements is ~30 us of single-thread work; below that a fork/join costs more than it saves.
std::atomic<int64_t> g_parallel_threshold{1 << 14};

// Groups per tile of the noisy step: its z (4 KiB) is produced and consumed while it is in L1.
constexpr uint32_t kTile = 256;

// Which code a range function is compiled for; picks the Philox implementation.
enum class Isa { kBaseline, kAvx2, kAvx512 };

using Words = PhiloxWords<kTile>;

// z[0 .. 4 count) = the normals of groups c0 .. c0 + count - 1 (all full, count <= kTile), in element order:
// the tile's Philox words (SIMD across groups), then Box-Muller in a loop the compiler vectorises across groups
// (the only shuffles: one 4-way interleave of z on the store).
template <Isa kIsa>
DDPM_HD void normal_groups(float* z, uint32_t c0, uint32_t count, uint32_t sample, uint32_t step, uint32_t stream,
                           uint32_t k0, uint32_t k1) {
  Words words;
#if DDPM_X86_DISPATCH
  if constexpr (kIsa == Isa::kAvx512) {
    philox_tile_avx512(words, c0, count, sample, step, stream, k0, k1);
  } else if constexpr (kIsa == Isa::kAvx2) {
    philox_tile_avx2(words, c0, count, sample, step, stream, k0, k1);
  } else
#endif
  {
    philox_tile_generic(words, c0, count, sample, step, stream, k0, k1);
  }
  const uint32_t* w0 = words.w[0];
  const uint32_t* w1 = words.w[1];
  const uint32_t* w2 = words.w[2];
  const uint32_t* w3 = words.w[3];
#pragma omp simd
  for (uint32_t i = 0; i < count; ++i) {
    float z0, z1, z2, z3;
    box_muller4(w0[i], w1[i], w2[i], w3[i], z0, z1, z2, z3);
    const size_t e = 4 * static_cast<size_t>(i);
    z[e + 0] = z0;
    z[e + 1] = z1;
    z[e + 2] = z2;
    z[e + 3] = z3;
  }
}

// How a step touches the history buffer h: not at all, store x0 only (c == 0: h is never read, it may hold
// garbage), or read c h and then store x0.
enum class Hist { kNone, kStore, kReadStore };

// The optional operands a step instantiation reads (bits of kOps). kVar is only ever set with noise: without
// noise sigma is unused, and so is v.
constexpr unsigned kGuide = 1;   // u: m -> u + S (m - u)
constexpr unsigned kThresh = 2;  // thresholds: clip -> s_row, then x0 / s_row
constexpr unsigned kVar = 4;     // v: sigma -> exp(lv0 + lv1 v)
constexpr unsigned kNumOps = 8;

// The affine update of elements [col, col + count) of sample `row`, given their noise z (ignored when kNoise is
// false: sigma = 0). No __restrict on x/m/out: out may be x or m (in place); every iteration reads its own x, m
// (and u, v, h) before writing. u and v never overlap out or h (checked by the bindings).
template <bool kNoise, Hist kHist, unsigned kOps>
DDPM_HD void affine_run(const StepArgs& A, int64_t row, int64_t col, const float* z, int64_t count) {
  constexpr bool kGuided = (kOps & kGuide) != 0, kDynamic = (kOps & kThresh) != 0;
  constexpr bool kLearned = kNoise && (kOps & kVar) != 0;
  const int64_t e0 = row * A.d + col;
  const float *x = A.x + e0, *m = A.m + row * A.m_stride + col;
  const float* u = kGuided ? A.u + row * A.u_stride + col : nullptr;
  const float* v = kLearned ? A.v + row * A.v_stride + col : nullptr;
  float *out = A.out + e0, *h = kHist == Hist::kNone ? nullptr : A.h + e0;
  const float a = A.a, b = A.b, c = A.c, p = A.p, q = A.q, sigma = A.sigma;
  const float bound = kDynamic ? A.thr[row] : A.clip;
  const float scale = A.guidance, lv0 = A.lv0, lv1 = A.lv1;
#pragma omp simd
  for (int64_t e = 0; e < count; ++e) {
    const float xe = x[e];
    float me = m[e];
    if constexpr (kGuided) me = guided(me, u[e], scale);
    float x0 = x0_hat(xe, me, p, q, bound);
    if constexpr (kDynamic) x0 = x0 / bound;
    const float ze = kNoise ? z[e] : 0.0f;
    float sig = sigma;
    if constexpr (kLearned) sig = learned_sigma(v[e], lv0, lv1);
    (void)scale, (void)lv0, (void)lv1, (void)u, (void)v;
    if constexpr (kHist == Hist::kReadStore) {
      out[e] = affine_history(xe, x0, h[e], ze, a, b, c, sig);
    } else {
      (void)c;
      out[e] = affine(xe, x0, ze, a, b, sig);
    }
    if constexpr (kHist != Hist::kNone) h[e] = x0;
  }
}

// The flat group range is walked one sample (row) at a time: the piece of [g, g_end) that lies in g's row.
// (A struct, not a lambda: a lambda's body would be compiled without the caller's target attribute.)
struct RowSpan {
  int64_t row, c_begin, c_end;  // groups [c_begin, c_end) of sample `row`
};

DDPM_HD RowSpan row_span(int64_t g, int64_t g_end, int64_t groups) {
  const int64_t row = g / groups, c_begin = g - row * groups;
  return {row, c_begin, std::min(groups, c_begin + (g_end - g))};
}

// Groups [g_begin, g_end) of the fused step. kNoise = false when sigma == 0 (DDPM's last step, deterministic
// DDIM): then no random numbers are drawn at all.
template <Isa kIsa, bool kNoise, Hist kHist, unsigned kOps>
DDPM_HD void step_range(const StepArgs& A, int64_t g_begin, int64_t g_end) {
  const int64_t d = A.d, full = d / 4;
  const uint32_t k0 = static_cast<uint32_t>(A.seed), k1 = static_cast<uint32_t>(A.seed >> 32);
  for (int64_t g = g_begin, groups = (d + 3) / 4; g < g_end;) {
    const auto [row, c_begin, c_end] = row_span(g, g_end, groups);
    g += c_end - c_begin;
    if constexpr (!kNoise) {
      const int64_t n_elems = std::min(d, 4 * c_end) - 4 * c_begin;
      affine_run<false, kHist, kOps>(A, row, 4 * c_begin, nullptr, n_elems);
    } else {
      const uint32_t sample = A.sample_offset + static_cast<uint32_t>(row);
      alignas(64) float z[4 * kTile];
      for (int64_t c = c_begin; c < c_end; c += kTile) {
        const int64_t n_groups = std::min<int64_t>(kTile, c_end - c);
        const int64_t n_full = std::max<int64_t>(0, std::min<int64_t>(n_groups, full - c));
        normal_groups<kIsa>(z, static_cast<uint32_t>(c), static_cast<uint32_t>(n_full), sample, A.step, kStreamStep,
                            k0, k1);
        if (n_full < n_groups) {  // the sample's partial last group (d not a multiple of 4)
          float* t = z + 4 * n_full;
          normal4(static_cast<uint32_t>(full), sample, A.step, kStreamStep, k0, k1, t[0], t[1], t[2], t[3]);
        }
        const int64_t n_elems = std::min(d, 4 * (c + n_groups)) - 4 * c;
        affine_run<true, kHist, kOps>(A, row, 4 * c, z, n_elems);
      }
    }
  }
}

template <Isa kIsa>
DDPM_HD void normal_range(const NormalArgs& A, int64_t g_begin, int64_t g_end) {
  const int64_t d = A.d, full = d / 4;
  const uint32_t k0 = static_cast<uint32_t>(A.seed), k1 = static_cast<uint32_t>(A.seed >> 32);
  for (int64_t g = g_begin, groups = (d + 3) / 4; g < g_end;) {
    const auto [row, c_begin, c_end] = row_span(g, g_end, groups);
    g += c_end - c_begin;
    const uint32_t sample = A.sample_offset + static_cast<uint32_t>(row);
    float* out = A.out + row * d;
    const int64_t c_full_end = std::min(c_end, full);
    for (int64_t c = c_begin; c < c_full_end; c += kTile) {
      const uint32_t n = static_cast<uint32_t>(std::min<int64_t>(kTile, c_full_end - c));
      normal_groups<kIsa>(out + 4 * c, static_cast<uint32_t>(c), n, sample, A.step, A.stream, k0, k1);
    }
    if (c_end > full) {  // partial last group: elements 4 full .. d-1
      float z[4];
      normal4(static_cast<uint32_t>(full), sample, A.step, A.stream, k0, k1, z[0], z[1], z[2], z[3]);
      for (int64_t j = 4 * full; j < d; ++j) out[j] = z[j - 4 * full];
    }
  }
}

// The Philox words of groups c0 .. c0 + count - 1 as [count, 4] (a test hook for the SIMD Philox: known answers
// need counter words that no tensor reaches).
template <Isa kIsa>
DDPM_HD void philox_words_impl(uint32_t* out, uint32_t c0, uint32_t count, uint32_t sample, uint32_t step,
                               uint32_t stream, uint32_t k0, uint32_t k1) {
  for (uint32_t done = 0; done < count; done += kTile) {
    const uint32_t n = std::min<uint32_t>(kTile, count - done);
    Words words;
#if DDPM_X86_DISPATCH
    if constexpr (kIsa == Isa::kAvx512) {
      philox_tile_avx512(words, c0 + done, n, sample, step, stream, k0, k1);
    } else if constexpr (kIsa == Isa::kAvx2) {
      philox_tile_avx2(words, c0 + done, n, sample, step, stream, k0, k1);
    } else
#endif
    {
      philox_tile_generic(words, c0 + done, n, sample, step, stream, k0, k1);
    }
    for (uint32_t i = 0; i < n; ++i) {
      for (int k = 0; k < 4; ++k) out[4 * static_cast<size_t>(done + i) + k] = words.w[k][i];
    }
  }
}

// ---- one copy of each range function per instruction set ----
using StepFn = void (*)(const StepArgs&, int64_t, int64_t);
using NormalFn = void (*)(const NormalArgs&, int64_t, int64_t);
using WordsFn = void (*)(uint32_t*, uint32_t, uint32_t, uint32_t, uint32_t, uint32_t, uint32_t, uint32_t);

// A variant is a struct whose static member templates carry the target attribute; step<kNoise, kHist, kOps> is one
// instantiation of the fused step (step_range is always_inline, so it is compiled for the variant's target).
#define DDPM_DEFINE_VARIANT(SUFFIX, ISA, ATTR)                                                                    \
  struct Variant_##SUFFIX {                                                                                       \
    template <bool kNoise, Hist kHist, unsigned kOps>                                                             \
    ATTR static void step(const StepArgs& A, int64_t b, int64_t e) {                                              \
      step_range<ISA, kNoise, kHist, kOps>(A, b, e);                                                              \
    }                                                                                                             \
    ATTR static void normal(const NormalArgs& A, int64_t b, int64_t e) { normal_range<ISA>(A, b, e); }           \
    ATTR static void words(uint32_t* o, uint32_t c0, uint32_t n, uint32_t s, uint32_t t, uint32_t k, uint32_t k0, \
                           uint32_t k1) {                                                                         \
      philox_words_impl<ISA>(o, c0, n, s, t, k, k0, k1);                                                          \
    }                                                                                                             \
  };

DDPM_DEFINE_VARIANT(base, Isa::kBaseline, )
#if DDPM_X86_DISPATCH
DDPM_DEFINE_VARIANT(avx2, Isa::kAvx2, __attribute__((target("arch=x86-64-v3"))))
DDPM_DEFINE_VARIANT(avx512, Isa::kAvx512, __attribute__((target("arch=x86-64-v4,prefer-vector-width=512"))))
#endif

using StepFns = std::array<std::array<std::array<StepFn, 3>, 2>, kNumOps>;  // [kOps][noise][Hist]

template <class V, unsigned kOps>
constexpr std::array<std::array<StepFn, 3>, 2> step_fns_for() {
  constexpr unsigned kQuiet = kOps & ~kVar;  // no noise: v is never read, share the instantiation without it
  return {{{&V::template step<false, Hist::kNone, kQuiet>, &V::template step<false, Hist::kStore, kQuiet>,
            &V::template step<false, Hist::kReadStore, kQuiet>},
           {&V::template step<true, Hist::kNone, kOps>, &V::template step<true, Hist::kStore, kOps>,
            &V::template step<true, Hist::kReadStore, kOps>}}};
}

template <class V, size_t... kOps>
constexpr StepFns step_fns(std::index_sequence<kOps...>) {
  return {step_fns_for<V, static_cast<unsigned>(kOps)>()...};
}

struct Kernels {
  StepFns step;
  NormalFn normal;
  WordsFn words;
  const char* name;
};

template <class V>
Kernels kernels_of(const char* name) {
  return Kernels{step_fns<V>(std::make_index_sequence<kNumOps>{}), &V::normal, &V::words, name};
}

Kernels kernels_named(const std::string& name) {
#if DDPM_X86_DISPATCH
  if (name == "avx512") return kernels_of<Variant_avx512>("avx512");
  if (name == "avx2") return kernels_of<Variant_avx2>("avx2");
#endif
  (void)name;
  return kernels_of<Variant_base>("baseline");
}

// The best variant this CPU runs (x86: from CPUID via __builtin_cpu_supports).
std::string best_target() {
#if DDPM_X86_DISPATCH
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw"))
    return "avx512";
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi2")) return "avx2";
#endif
  return "baseline";
}

std::atomic<const Kernels*> g_kernels{nullptr};

const Kernels& kernels() {
  const Kernels* k = g_kernels.load(std::memory_order_acquire);
  if (k == nullptr) {
    static const Kernels best = kernels_named(best_target());
    k = &best;
  }
  return *k;
}

// Split the flat group range over threads in chunks of at most kMaxChunk groups (4096 elements, a few us of
// work), handed out dynamically: on a loaded machine a thread descheduled mid-step then holds up one chunk, not a
// static half of the tensor. Chunks are multiples of 64 groups, and at least ~4 per thread. `cost` = elements
// weighted by their work, compared with the parallel threshold.
constexpr int64_t kMaxChunk = 4 * kTile;

template <class Body>
void parallel_groups(int64_t total_groups, int64_t cost, Body&& body) {
  int threads = 1;
#ifdef DDPM_HAVE_OPENMP
  if (cost >= g_parallel_threshold.load(std::memory_order_relaxed) && total_groups > 64) {
    threads = omp_get_max_threads();
  }
#endif
  if (threads <= 1) {
    body(int64_t{0}, total_groups);
    return;
  }
#ifdef DDPM_HAVE_OPENMP
  const int64_t per_chunk = (total_groups + 4 * threads - 1) / (4 * threads);
  const int64_t chunk = std::min(kMaxChunk, std::max<int64_t>(64, (per_chunk + 63) / 64 * 64));
  const int64_t chunks = (total_groups + chunk - 1) / chunk;
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
  for (int64_t c = 0; c < chunks; ++c) body(c * chunk, std::min(total_groups, (c + 1) * chunk));
#endif
}

}  // namespace

void fused_step(const StepArgs& args) {
  const int64_t total = args.n * ((args.d + 3) / 4);
  const bool noise = args.sigma != 0.0f;
  const Hist hist = args.h == nullptr ? Hist::kNone : args.c == 0.0f ? Hist::kStore : Hist::kReadStore;
  const unsigned ops = (args.u != nullptr ? kGuide : 0u) | (args.thr != nullptr ? kThresh : 0u) |
                       (noise && args.v != nullptr ? kVar : 0u);
  const StepFn fn = kernels().step[ops][noise][static_cast<int>(hist)];
  // Without noise a step is a few flops per element: worth threads only at ~8x the size.
  const int64_t cost = noise ? args.n * args.d : args.n * args.d / 8;
  parallel_groups(total, cost, [&](int64_t lo, int64_t hi) { fn(args, lo, hi); });
}

namespace {

// torch.lerp's formula (ATen's lerp): the two forms keep the result exact at w = 0 and at w = 1.
float torch_lerp(float lo, float hi, float w) { return std::fabs(w) < 0.5f ? lo + w * (hi - lo) : hi - (hi - lo) * (1.0f - w); }

// The order statistics sorted[lo] and sorted[lo + 1] (or sorted[lo] twice when lo == d - 1) of buf[0, d), by
// nth_element; buf is reordered and spare (d floats) is scratch. For a high quantile (Imagen's ratio 0.995: the
// k = d - lo largest values matter, k << d) the full selection is mostly wasted, so first: a cut from an
// every-8th subsample (about 2k + 8 of its values lie above it), then the values >= cut as candidates. If there
// are at least k of them, every one of the k largest values is >= cut (else fewer than k values would be), so the
// selection among the candidates is exact; otherwise (ties, unlucky data) the full selection runs.
std::pair<float, float> upper_order_stats(float* buf, float* spare, int64_t d, int64_t lo) {
  const int64_t k = d - lo;
  if (d >= 256 && k * 16 <= d) {
    const int64_t ns = d / 8, ks = std::min(ns, 2 * (k / 8) + 8);
    for (int64_t j = 0; j < ns; ++j) spare[j] = buf[8 * j];
    std::nth_element(spare, spare + (ns - ks), spare + ns);
    const float cut = spare[ns - ks];
    int64_t count = 0;
    for (int64_t e = 0; e < d; ++e) {
      if (buf[e] >= cut) spare[count++] = buf[e];
    }
    if (count >= k) {
      float* at = spare + (count - k);
      std::nth_element(spare, at, spare + count);
      return {*at, k == 1 ? *at : *std::min_element(at + 1, spare + count)};
    }
  }
  std::nth_element(buf, buf + lo, buf + d);
  return {buf[lo], k == 1 ? buf[lo] : *std::min_element(buf + lo + 1, buf + d)};
}

// The threshold of sample `row`; buf holds 2 d floats of scratch.
float row_threshold(const ThresholdArgs& A, int64_t row, float* buf) {
  const int64_t d = A.d;
  const float *x = A.x + row * d, *m = A.m + row * A.m_stride;
  const float* u = A.u == nullptr ? nullptr : A.u + row * A.u_stride;
  const float p = A.p, q = A.q, scale = A.guidance;
  int bad = 0;
  if (u != nullptr) {
#pragma omp simd reduction(| : bad)
    for (int64_t e = 0; e < d; ++e) {
      const float v = std::fabs(p * x[e] + q * guided(m[e], u[e], scale));
      bad |= v != v;
      buf[e] = v;
    }
  } else {
#pragma omp simd reduction(| : bad)
    for (int64_t e = 0; e < d; ++e) {
      const float v = std::fabs(p * x[e] + q * m[e]);
      bad |= v != v;
      buf[e] = v;
    }
  }
  if (bad) return std::numeric_limits<float>::quiet_NaN();  // torch.quantile's answer for a row with a NaN
  // torch.quantile: the rank in the input's dtype (float32), its floor and ceiling, and their lerp. rank <= d - 1
  // (ratio <= 1), so ceil(rank) is floor(rank) or floor(rank) + 1.
  const float rank = A.ratio * static_cast<float>(d - 1);
  const int64_t lo = std::min<int64_t>(static_cast<int64_t>(rank), d - 1);
  const auto [v_lo, v_next] = upper_order_stats(buf, buf + d, d, lo);
  const float v_hi = static_cast<float>(lo) == rank ? v_lo : v_next;
  float s = torch_lerp(v_lo, v_hi, rank - static_cast<float>(lo));
  s = s < 1.0f ? 1.0f : s;  // torch.clamp(s, min=1, max=max_value); a NaN passes
  return s > A.max_value ? A.max_value : s;
}

}  // namespace

void dynamic_thresholds(const ThresholdArgs& args) {
  int threads = 1;
#ifdef DDPM_HAVE_OPENMP
  if (args.n > 1 && args.n * args.d >= g_parallel_threshold.load(std::memory_order_relaxed)) {
    threads = static_cast<int>(std::min<int64_t>(omp_get_max_threads(), args.n));
  }
#endif
  if (threads <= 1) {
    std::vector<float> buf(2 * static_cast<size_t>(args.d));
    for (int64_t k = 0; k < args.n; ++k) args.out[k] = row_threshold(args, k, buf.data());
    return;
  }
#ifdef DDPM_HAVE_OPENMP
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> buf(2 * static_cast<size_t>(args.d));
#pragma omp for schedule(dynamic, 1)
    for (int64_t k = 0; k < args.n; ++k) args.out[k] = row_threshold(args, k, buf.data());
  }
#endif
}

void normal(const NormalArgs& args) {
  const int64_t total = args.n * ((args.d + 3) / 4);
  const NormalFn fn = kernels().normal;
  parallel_groups(total, args.n * args.d, [&](int64_t lo, int64_t hi) { fn(args, lo, hi); });
}

void philox_words(uint32_t* out, uint32_t c0, uint32_t count, uint32_t sample, uint32_t step, uint32_t stream,
                  uint64_t seed) {
  kernels().words(out, c0, count, sample, step, stream, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

int64_t parallel_threshold() { return g_parallel_threshold.load(); }
void set_parallel_threshold(int64_t elements) { g_parallel_threshold.store(std::max<int64_t>(elements, 1)); }
const char* simd_target() { return kernels().name; }

std::vector<std::string> simd_targets() {
  std::vector<std::string> names{"baseline"};
  const std::string best = best_target();
  if (best == "avx2" || best == "avx512") names.push_back("avx2");
  if (best == "avx512") names.push_back("avx512");
  return names;
}

void set_simd_target(const std::string& name) {
  static const Kernels all[] = {kernels_named("baseline"), kernels_named("avx2"), kernels_named("avx512")};
  if (name.empty()) {
    g_kernels.store(nullptr, std::memory_order_release);
    return;
  }
  for (const std::string& ok : simd_targets()) {
    if (ok == name) {
      for (const Kernels& k : all) {
        if (name == k.name) g_kernels.store(&k, std::memory_order_release);
      }
      return;
    }
  }
  throw std::invalid_argument("simd target '" + name + "' is not available on this CPU");
}

}  // namespace ddpm::cpu
