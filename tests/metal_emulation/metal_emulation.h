// Stands in for the Metal built-ins that the kernels in metal/ use, so that a
// kernel's source, with the signature mx.fast.metal_kernel writes for it, is
// compiled by a C++ compiler and run on the CPU by runtime.cpp.
//
// Scope: address-space qualifiers, half / bfloat, uint3-style vectors, the
// math functions, mem_flags, threadgroup_barrier / simdgroup_barrier and the
// simd_* reductions and shuffles (all 32 lanes of a simdgroup must take part,
// as in uniform control flow on the GPU). Threadgroup arrays declared in a
// kernel body are rewritten by the emulator into memory shared by the
// threads of one threadgroup.
//
// Not emulated: address spaces are erased (mixing a constant and a device
// pointer compiles here but not for Metal), simd operations in divergent
// code, and Metal's own reduction order (simd_sum adds lanes in order).
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>

#define device
#define constant
#define thread
#define threadgroup

typedef unsigned int uint;

#if defined(__FLT16_MAX__) && !defined(METAL_EMU_SOFT_HALF)
typedef _Float16 half;
#else
// For compilers without _Float16: IEEE half with round-to-nearest-even.
struct half {
  uint16_t bits;
  half() = default;
  half(float f) : bits(from_float(f)) {}
  operator float() const {
    uint32_t sign = uint32_t(bits & 0x8000u) << 16;
    uint32_t e = (bits >> 10) & 0x1fu, m = bits & 0x3ffu;
    if (e == 0) {
      float f = float(m) * (1.0f / 16777216.0f);
      return sign ? -f : f;
    }
    uint32_t u = sign | (e == 31 ? 0x7f800000u | (m << 13) : ((e + 112u) << 23) | (m << 13));
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  static uint16_t from_float(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    uint16_t sign = uint16_t((u >> 16) & 0x8000u);
    uint32_t a = u & 0x7fffffffu;
    if (a >= 0x7f800000u) {
      return sign | (a > 0x7f800000u ? 0x7e00u : 0x7c00u);
    }
    if (a >= 0x477ff000u) {  // rounds to infinity
      return sign | 0x7c00u;
    }
    if (a < 0x38800000u) {  // subnormal: a * 2^24 is exact, nearbyint rounds to even
      float x;
      std::memcpy(&x, &a, 4);
      return sign | uint16_t(std::nearbyint(x * 16777216.0f));
    }
    uint32_t h = ((a >> 23) - 112u) << 10 | ((a & 0x7fffffu) >> 13);
    uint32_t rest = a & 0x1fffu;
    if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) {
      h++;
    }
    return sign | uint16_t(h);
  }
};
#endif

struct bfloat {
  uint16_t bits;
  bfloat() = default;
  bfloat(float f) : bits(from_float(f)) {}
  operator float() const {
    uint32_t u = uint32_t(bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  // Round to nearest even, as the GPU converts.
  static uint16_t from_float(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
      return uint16_t((u >> 16) | 0x40u);
    }
    u += 0x7fffu + ((u >> 16) & 1u);
    return uint16_t(u >> 16);
  }
};

typedef half float16_t;
typedef bfloat bfloat16_t;

template <typename E>
struct vec2 {
  E x, y;
};
template <typename E>
struct vec3 {
  E x, y, z;
};
template <typename E>
struct vec4 {
  E x, y, z, w;
};
typedef vec2<uint> uint2;
typedef vec3<uint> uint3;
typedef vec2<int> int2;
typedef vec3<int> int3;
typedef vec2<float> float2;
typedef vec4<float> float4;

enum class mem_flags : int { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4 };
inline mem_flags operator|(mem_flags a, mem_flags b) {
  return mem_flags(int(a) | int(b));
}

namespace metal_emu {
// Implemented by runtime.cpp.
void threadgroup_barrier();
void simdgroup_barrier();
// Publishes this lane's value and returns every lane's value of the same
// simd operation (lanes of the simdgroup, in lane order).
int simd_exchange(const void* value, size_t size, void* all);
int lane();
void* threadgroup_alloc(size_t size, size_t align);
constexpr int simd_width = 32;
}  // namespace metal_emu

namespace metal {
using std::numeric_limits;

inline float exp(float x) { return std::exp(x); }
inline float exp2(float x) { return std::exp2(x); }
inline float log(float x) { return std::log(x); }
inline float sqrt(float x) { return std::sqrt(x); }
inline float rsqrt(float x) { return 1.0f / std::sqrt(x); }
inline float abs(float x) { return std::fabs(x); }
inline float fabs(float x) { return std::fabs(x); }
inline float fma(float a, float b, float c) { return std::fma(a, b, c); }
inline bool isinf(float x) { return std::isinf(x); }
inline bool isnan(float x) { return std::isnan(x); }
inline float max(float a, float b) { return std::fmax(a, b); }
inline float min(float a, float b) { return std::fmin(a, b); }
inline int max(int a, int b) { return a > b ? a : b; }
inline int min(int a, int b) { return a < b ? a : b; }
inline uint max(uint a, uint b) { return a > b ? a : b; }
inline uint min(uint a, uint b) { return a < b ? a : b; }
inline int64_t max(int64_t a, int64_t b) { return a > b ? a : b; }
inline int64_t min(int64_t a, int64_t b) { return a < b ? a : b; }
namespace fast {
inline float exp(float x) { return std::exp(x); }
inline float exp2(float x) { return std::exp2(x); }
}  // namespace fast
namespace precise {
inline float exp(float x) { return std::exp(x); }
}  // namespace precise

inline void threadgroup_barrier(mem_flags) { metal_emu::threadgroup_barrier(); }
inline void simdgroup_barrier(mem_flags) { metal_emu::simdgroup_barrier(); }

template <typename V>
inline V simd_sum(V x) {
  V all[metal_emu::simd_width];
  int n = metal_emu::simd_exchange(&x, sizeof(V), all);
  V s = all[0];
  for (int i = 1; i < n; ++i) {
    s += all[i];
  }
  return s;
}

template <typename V>
inline V simd_max(V x) {
  V all[metal_emu::simd_width];
  int n = metal_emu::simd_exchange(&x, sizeof(V), all);
  V s = all[0];
  for (int i = 1; i < n; ++i) {
    s = max(s, all[i]);
  }
  return s;
}

template <typename V>
inline V simd_min(V x) {
  V all[metal_emu::simd_width];
  int n = metal_emu::simd_exchange(&x, sizeof(V), all);
  V s = all[0];
  for (int i = 1; i < n; ++i) {
    s = min(s, all[i]);
  }
  return s;
}

template <typename V>
inline V simd_shuffle(V x, uint16_t lane) {
  V all[metal_emu::simd_width];
  int n = metal_emu::simd_exchange(&x, sizeof(V), all);
  return lane < n ? all[lane] : x;
}

template <typename V>
inline V simd_broadcast(V x, uint16_t lane) {
  return simd_shuffle(x, lane);
}

template <typename V>
inline V simd_shuffle_xor(V x, uint16_t mask) {
  V all[metal_emu::simd_width];
  int n = metal_emu::simd_exchange(&x, sizeof(V), all);
  int other = metal_emu::lane() ^ mask;
  return other < n ? all[other] : x;
}

template <typename V>
inline V simd_shuffle_down(V x, uint16_t delta) {
  V all[metal_emu::simd_width];
  int n = metal_emu::simd_exchange(&x, sizeof(V), all);
  int other = metal_emu::lane() + delta;
  return other < n ? all[other] : x;
}
}  // namespace metal

using namespace metal;

// What the generated kernel receives for the thread-position attributes.
namespace metal_emu {
struct ThreadIds {
  uint dispatch_quadgroups_per_threadgroup;
  uint dispatch_simdgroups_per_threadgroup;
  uint3 dispatch_threads_per_threadgroup;
  uint3 grid_origin;
  uint3 grid_size;
  uint quadgroup_index_in_threadgroup;
  uint quadgroups_per_threadgroup;
  uint simdgroup_index_in_threadgroup;
  uint simdgroups_per_threadgroup;
  uint thread_execution_width;
  uint thread_index_in_quadgroup;
  uint thread_index_in_simdgroup;
  uint thread_index_in_threadgroup;
  uint3 thread_position_in_grid;
  uint3 thread_position_in_threadgroup;
  uint3 threadgroup_position_in_grid;
  uint3 threadgroups_per_grid;
  uint3 threads_per_grid;
  uint threads_per_simdgroup;
  uint3 threads_per_threadgroup;
};
}  // namespace metal_emu

// The generated translation unit defines this: it calls the kernel for one
// thread with the argument table in mx.fast.metal_kernel's buffer order.
void emu_invoke(void* const* buffers, const metal_emu::ThreadIds& ids);
