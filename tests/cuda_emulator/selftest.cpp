// Checks of the emulator itself, bound into the emulated extension as emu_* functions
// (tests/test_cuda_emulated.py): it must catch a missing __syncthreads or __syncwarp, a barrier
// some threads skip, a store into a cp.async destination in flight, and report errors raised
// inside a thread; its m16n8k16 fragment layouts must be CuTe's (which CuTe's kernels rely on).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <vector>

#include "emu_cuda.h"

namespace {

// Warp 1 writes a word for each lane of warp 0, which reads it, with or without a barrier between.
__global__ void cross_warp_read(float* out, bool barrier) {
  float* words = reinterpret_cast<float*>(echo_emu::shared_memory());
  const int t = threadIdx.x;
  if (t >= 32) words[t - 32] = 1.0f;
  if (barrier) __syncthreads();
  if (t < 32) out[t] = words[t];
}

// Only warp 0 reaches the barrier.
__global__ void divergent_barrier() {
  if (threadIdx.x < 32) __syncthreads();
}

// Only half of the warp reaches the shuffle.
__global__ void half_warp_shuffle(float* out) {
  if (threadIdx.x < 16) out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
}

// Each lane writes its row of a 16 x 16 tile and the warp loads the tile as a WMMA operand,
// with or without the __syncwarp the load needs.
__global__ void wmma_load_after_writes(float* out, bool sync) {
  __half* tile = reinterpret_cast<__half*>(echo_emu::shared_memory());
  const int lane = threadIdx.x;
  if (lane < 16) {
    for (int c = 0; c < 16; ++c) tile[lane * 16 + c] = __float2half(float(lane + c));
  }
  if (sync) __syncwarp();
  nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, __half, nvcuda::wmma::row_major> a;
  nvcuda::wmma::load_matrix_sync(a, tile, 16);
  if (lane == 0) out[0] = __half2float(a.x[16 * 15 + 15]);
}

// A cp.async into shared memory, a plain store into the same bytes before its wait.
__global__ void store_into_copy_in_flight(const float* src) {
  float* words = reinterpret_cast<float*>(echo_emu::shared_memory());
  if (threadIdx.x == 0) {
    echo_emu::cp_async(words, src, 16);
    echo_emu::cp_async_fence();
    words[1] = 2.0f;
    echo_emu::cp_async_wait(0);
  }
}

// An error raised inside a thread (a shuffle of half a warp, which the emulator does not model).
__global__ void partial_shuffle(float* out) {
  out[threadIdx.x] = __shfl_xor_sync(0x0000ffffu, 1.0f, 1);
}

// One ldmatrix.x4 whose 32 rows lie `stride` bytes apart.
__global__ void strided_ldmatrix(int stride) {
  uint32_t d[4];
  echo_emu::ldmatrix_x4(echo_emu::shared_memory() + threadIdx.x * stride, d[0], d[1], d[2], d[3], false);
}

// (thread, value) -> flat index layouts of CuTe's atom against the emulator's (row, col);
// CuTe's index is row + rows * col. Returns the number of disagreeing entries.
template <typename Layout, typename Element>
int layout_mismatches(Layout layout, int rows, bool transposed, Element element) {
  int bad = 0;
  for (int lane = 0; lane < 32; ++lane) {
    for (int value = 0; value < int(cute::size<1>(layout)); ++value) {
      const int index = layout(lane, value);
      const echo_emu::RowCol e = element(lane, value);
      const int row = transposed ? e.col : e.row;
      const int col = transposed ? e.row : e.col;
      bad += index != row + rows * col;
    }
  }
  return bad;
}

}  // namespace

void echo_emu_bind_selftests(pybind11::module_& m) {
  m.def("emu_cross_warp_read", [](bool barrier) {
    std::vector<float> out(32, 0.0f);
    echo_emu::launch(cross_warp_read, dim3(1), dim3(64), 32 * sizeof(float))(out.data(), barrier);
    return out;
  });
  m.def("emu_divergent_barrier", [] { echo_emu::launch(divergent_barrier, dim3(1), dim3(64))(); });
  m.def("emu_half_warp_shuffle", [] {
    std::vector<float> out(16, 0.0f);
    echo_emu::launch(half_warp_shuffle, dim3(1), dim3(32))(out.data());
  });
  m.def("emu_wmma_load_after_writes", [](bool sync) {
    float out = 0.0f;
    echo_emu::launch(wmma_load_after_writes, dim3(1), dim3(32), 16 * 16 * sizeof(__half))(&out, sync);
    return out;
  });
  m.def("emu_store_into_copy_in_flight", [] {
    alignas(16) float src[4] = {1.0f, 1.0f, 1.0f, 1.0f};
    echo_emu::launch(store_into_copy_in_flight, dim3(1), dim3(32), 16)(static_cast<const float*>(src));
  });
  m.def("emu_partial_shuffle", [] {
    std::vector<float> out(32, 0.0f);
    echo_emu::launch(partial_shuffle, dim3(1), dim3(32))(out.data());
  });
  m.def("emu_counters", [] {
    const echo_emu::Counters& c = echo_emu::performance_counters();
    pybind11::dict d;
    d["ldmatrix_phases"] = c.ldmatrix_phases;
    d["ldmatrix_conflicted_phases"] = c.ldmatrix_conflicted_phases;
    return d;
  });
  m.def("emu_reset_counters", [] { echo_emu::performance_counters() = echo_emu::Counters{}; });
  m.def("emu_strided_ldmatrix", [](int stride) {
    echo_emu::launch(strided_ldmatrix, dim3(1), dim3(32), 32 * stride)(stride);
  });
  m.def("emu_mma_layout_mismatches", [] {
    using Traits = cute::MMA_Traits<cute::SM80_16x8x16_F32F16F16F32_TN>;
    using TraitsBf16 = cute::MMA_Traits<cute::SM80_16x8x16_F32BF16BF16F32_TN>;
    std::vector<int> bad;
    // A is (M 16, K 16); B is (N 8, K 16) in CuTe, (k, n) in the emulator; C is (M 16, N 8).
    bad.push_back(layout_mismatches(typename Traits::ALayout{}, 16, false, echo_emu::mma_a_element));
    bad.push_back(layout_mismatches(typename Traits::BLayout{}, 8, true, echo_emu::mma_b_element));
    bad.push_back(layout_mismatches(typename Traits::CLayout{}, 16, false, echo_emu::mma_c_element));
    bad.push_back(layout_mismatches(typename TraitsBf16::ALayout{}, 16, false, echo_emu::mma_a_element));
    bad.push_back(layout_mismatches(typename TraitsBf16::BLayout{}, 8, true, echo_emu::mma_b_element));
    bad.push_back(layout_mismatches(typename TraitsBf16::CLayout{}, 16, false, echo_emu::mma_c_element));
    return bad;
  });
}
