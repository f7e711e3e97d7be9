// The warp-level instructions of the CuTe atoms the register-resident kernels use, emulated
// (runtime.cpp). build.py patches CuTe's copies of those atoms to call these instead of their
// PTX, so this header comes first in every patched CuTe file: declarations only, no CUDA.
#pragma once

#include <cstddef>
#include <cstdint>

namespace echo_emu {

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}: the warp's 32 lanes meet, each lane gets
// its own four accumulator values (PTX ISA fragment layouts).
void mma_m16n8k16(bool bf16, float& d0, float& d1, float& d2, float& d3, uint32_t a0, uint32_t a1, uint32_t a2,
                  uint32_t a3, uint32_t b0, uint32_t b1, float c0, float c1, float c2, float c3);

// ldmatrix.sync.aligned.x4[.trans].m8n8.shared.b16: every lane names one 16-byte row.
void ldmatrix_x4(const void* row, uint32_t& d0, uint32_t& d1, uint32_t& d2, uint32_t& d3, bool transpose);

// cp.async of `bytes` bytes: the destination is poisoned now and written when a wait retires
// its group, so reading it too early (or overwriting it while others still read) shows.
void cp_async(void* dst, const void* src, std::size_t bytes);
void cp_async_fence();
void cp_async_wait(int groups_left);

}  // namespace echo_emu
