// CUDA on the CPU, for the tests: enough of the CUDA C++ language and runtime to compile the
// kernels of csrc/cuda with the host compiler and run them, one CTA at a time, each of its
// threads a fiber (runtime.cpp). build.py prepends this header to a copy of every kernel file.
//
// What it models: threads, warps, blocks and the grid; __syncthreads and the warp collectives
// (__shfl_xor_sync, __syncwarp, mma.sync, ldmatrix) as rendezvous of the threads involved, so
// a barrier some threads skip is a reported deadlock, not a hang; dynamic shared memory,
// poisoned (all-ones bytes: NaN) at the start of every block; cp.async completing only at its
// wait. WMMA fragments hold the whole 16x16 tile in every lane (the kernels only use them
// through the wmma functions); wmma loads and stores are warp rendezvous, and a load checks
// that every lane read the same bytes. Floating point is the CPU's: results match a GPU's to
// rounding.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>
#include <vector_functions.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <type_traits>

#include <cute/tensor.hpp>

#include "emu_hooks.h"

#ifndef __global__
#define __global__
#endif
#ifndef __device__
#define __device__
#endif
#ifndef __host__
#define __host__
#endif
#ifndef __forceinline__
#define __forceinline__ inline
#endif
#ifndef __align__
#define __align__(n) alignas(n)
#endif
#define __launch_bounds__(...)
// build.py rewrites the kernels' one form of shared memory (extern __shared__ ... name[];); any
// other use would silently become per-thread memory on the host, so it must not compile.
#undef __shared__
#define __shared__ ECHO_EMU_rewrite_this_shared_memory_declaration
#undef __constant__
#define __constant__ ECHO_EMU_constant_memory_is_not_emulated

namespace echo_emu {

// The running thread's coordinates (set by the scheduler for the fiber it switches to).
uint3 thread_index();
uint3 block_index();
dim3 block_dim();
dim3 grid_dim();
unsigned char* shared_memory();

void sync_threads();
void sync_warp(unsigned mask);
uint32_t shfl_xor_bits(uint32_t value, int lane_mask);
uint32_t shfl_xor_bits(unsigned mask, int width, uint32_t value, int lane_mask);
// WMMA loads and stores are warp-synchronous. A load also compares what the lanes read: every lane
// holds the whole tile here, so lanes that read different bytes mean a missing __syncwarp.
void wmma_rendezvous();
void wmma_load_rendezvous(uint64_t digest);

// FNV-1a of a fragment's bytes.
inline uint64_t digest(const void* data, std::size_t bytes) {
  uint64_t h = 1469598103934665603ull;
  for (std::size_t i = 0; i < bytes; ++i) h = (h ^ static_cast<const unsigned char*>(data)[i]) * 1099511628211ull;
  return h;
}

// Which element of an m16n8k16 operand (A 16 x 16, B 16 x 8 as k x n, C/D 16 x 8) value
// `value` of lane `lane` holds (runtime.cpp; the self-test compares them with CuTe's traits).
struct RowCol {
  int row;
  int col;
};
RowCol mma_a_element(int lane, int value);
RowCol mma_b_element(int lane, int value);
RowCol mma_c_element(int lane, int value);

// What the emulator counts (since the last reset), for the tests of the kernels' shared-memory
// access patterns.
struct Counters {
  uint64_t ldmatrix_phases = 0;  // 8-row phases of ldmatrix
  uint64_t ldmatrix_conflicted_phases = 0;  // phases whose rows share a bank
};
Counters& performance_counters();

// Runs body() once per thread of every block of the grid (blocks one after another).
void run_grid(dim3 grid, dim3 block, std::size_t shared_bytes, const std::function<void()>& body);

// kernel<<<grid, block, bytes, stream>>>(args...) becomes launch(kernel, grid, block, bytes, stream)(args...).
template <typename Kernel>
auto launch(Kernel* kernel, dim3 grid, dim3 block, std::size_t shared_bytes = 0, cudaStream_t = nullptr) {
  return [=](auto... args) { run_grid(grid, block, shared_bytes, [&] { kernel(args...); }); };
}

}  // namespace echo_emu

#define threadIdx (::echo_emu::thread_index())
#define blockIdx (::echo_emu::block_index())
#define blockDim (::echo_emu::block_dim())
#define gridDim (::echo_emu::grid_dim())

inline void __syncthreads() { echo_emu::sync_threads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { echo_emu::sync_warp(mask); }

template <typename T>
inline T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = 32) {
  static_assert(sizeof(T) == 4, "32-bit shuffles only");
  uint32_t bits;
  std::memcpy(&bits, &value, 4);
  bits = echo_emu::shfl_xor_bits(mask, width, bits, lane_mask);
  std::memcpy(&value, &bits, 4);
  return value;
}

inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline float __sinf(float x) { return std::sin(x); }
inline float __cosf(float x) { return std::cos(x); }
inline void __sincosf(float x, float* s, float* c) {
  *s = std::sin(x);
  *c = std::cos(x);
}

template <typename T>
cudaError_t cudaFuncSetAttribute(T*, cudaFuncAttribute, int) {
  return cudaSuccess;
}

// ---- WMMA: every lane holds the whole tile --------------------------------------------------

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static constexpr int kRows = std::is_same_v<Use, matrix_b> ? K : M;
  static constexpr int kCols = std::is_same_v<Use, matrix_a> ? K : N;
  static constexpr int num_elements = kRows * kCols;
  T x[num_elements];
  float at(int r, int c) const { return static_cast<float>(x[r * kCols + c]); }
};

template <typename Use, int M, int N, int K, typename T, typename Layout>
inline void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, T value) {
  for (auto& e : f.x) e = value;
}

template <typename Use, int M, int N, int K, typename T, typename Layout>
inline void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const T* p, unsigned ld) {
  using F = fragment<Use, M, N, K, T, Layout>;
  for (int r = 0; r < F::kRows; ++r)
    for (int c = 0; c < F::kCols; ++c)
      f.x[r * F::kCols + c] = std::is_same_v<Layout, col_major> ? p[c * ld + r] : p[r * ld + c];
  echo_emu::wmma_load_rendezvous(echo_emu::digest(f.x, sizeof(f.x)));  // all have read before any later store
}

template <int M, int N, int K>
inline void load_matrix_sync(fragment<accumulator, M, N, K, float>& f, const float* p, unsigned ld, layout_t layout) {
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < N; ++c) f.x[r * N + c] = layout == mem_row_major ? p[r * ld + c] : p[c * ld + r];
  echo_emu::wmma_load_rendezvous(echo_emu::digest(f.x, sizeof(f.x)));
}

template <int M, int N, int K>
inline void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, float>& f, unsigned ld, layout_t layout) {
  echo_emu::wmma_rendezvous();
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < N; ++c) (layout == mem_row_major ? p[r * ld + c] : p[c * ld + r]) = f.x[r * N + c];
}

template <int M, int N, int K, typename T, typename LA, typename LB>
inline void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, T, LA>& a,
                     const fragment<matrix_b, M, N, K, T, LB>& b, const fragment<accumulator, M, N, K, float>& c) {
  float out[M * N];
  for (int r = 0; r < M; ++r) {
    for (int n = 0; n < N; ++n) {
      float sum = c.x[r * N + n];
      for (int k = 0; k < K; ++k) sum = std::fma(a.at(r, k), b.at(k, n), sum);
      out[r * N + n] = sum;
    }
  }
  std::memcpy(d.x, out, sizeof(out));
}

}  // namespace wmma
}  // namespace nvcuda
