// The scheduler behind emu_cuda.h: one block at a time, each thread a ucontext fiber run until
// it reaches a barrier or a warp collective; a barrier opens when every thread it waits for has
// arrived at the same kind of barrier. Any other state with nothing runnable is a deadlock (a
// barrier some threads skip, a collective half a warp reaches) and is reported as an error.
// Warps run one at a time, each as far ahead of the others as the barriers allow, so a missing
// barrier shows up as a read of memory another warp has not written yet (poisoned).
#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <exception>
#include <memory>
#include <new>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "emu_cuda.h"

namespace echo_emu {
namespace {

constexpr int kWarpSize = 32;
constexpr std::size_t kStackBytes = 512 * 1024;  // the kernels' frames are tens of KiB at most
constexpr std::size_t kGuardBytes = 4096;  // PROT_NONE below each stack: an overflow faults
constexpr std::size_t kSharedAlignment = 1024;
constexpr int kSlotWords = 8;  // per lane in a warp exchange: mma's 6 operand registers fit

enum class State { kRunnable, kBlockBarrier, kWarpBarrier, kDone };

// What a lane waits for at a warp rendezvous; every lane of the warp must wait for the same.
enum class Collective { kSyncWarp, kShuffle, kMma, kLdmatrix, kWmma, kRelease };

struct Copy {
  void* dst;
  const void* src;
  std::size_t bytes;
};

// A fiber's stack, mmap-ed with a guard page below it.
class Stack {
 public:
  Stack() {
    base_ = mmap(nullptr, kGuardBytes + kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base_ == MAP_FAILED) throw std::bad_alloc();
    mprotect(base_, kGuardBytes, PROT_NONE);
  }
  ~Stack() { munmap(base_, kGuardBytes + kStackBytes); }
  Stack(const Stack&) = delete;
  Stack& operator=(const Stack&) = delete;
  void* bottom() const { return static_cast<char*>(base_) + kGuardBytes; }

 private:
  void* base_;
};

// Dynamic shared memory, aligned as the kernels declare it (__align__(128) and more).
struct SharedMemory {
  explicit SharedMemory(std::size_t bytes)
      : data(static_cast<unsigned char*>(::operator new(bytes ? bytes : 1, std::align_val_t{kSharedAlignment}))),
        size(bytes) {
    std::memset(data, 0xff, bytes);  // NaN in every float / half: unwritten reads show
  }
  ~SharedMemory() { ::operator delete(data, std::align_val_t{kSharedAlignment}); }
  SharedMemory(const SharedMemory&) = delete;
  SharedMemory& operator=(const SharedMemory&) = delete;
  unsigned char* data;
  std::size_t size;
};

struct Fiber {
  ucontext_t context;
  uint3 index;
  State state = State::kRunnable;
  Collective waiting_for = Collective::kSyncWarp;
  std::vector<Copy> open_group;  // cp.async copies not yet committed
  std::deque<std::vector<Copy>> committed;
};

// Each lane's words in a warp exchange.
struct Warp {
  uint32_t words[kWarpSize][kSlotWords];
};

struct Block {
  explicit Block(std::size_t shared_bytes) : shared(shared_bytes) {}
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  SharedMemory shared;
  std::exception_ptr error;  // thrown in a fiber, rethrown on the scheduler's stack
  uint3 index;
  dim3 dim;
  dim3 grid;
  ucontext_t scheduler;
  const std::function<void()>* body;
};

thread_local Block* current_block = nullptr;
thread_local Counters counters;
thread_local Fiber* current_fiber = nullptr;

Fiber& self() {
  if (current_fiber == nullptr) throw std::logic_error("echo_emu: device code called outside a kernel launch");
  return *current_fiber;
}

int linear_thread() {
  const uint3 t = self().index;
  return static_cast<int>(t.x + current_block->dim.x * (t.y + current_block->dim.y * t.z));
}

int lane() { return linear_thread() % kWarpSize; }

void yield(State state, Collective collective = Collective::kSyncWarp) {
  Fiber& f = self();
  f.state = state;
  f.waiting_for = collective;
  swapcontext(&f.context, &current_block->scheduler);
}

// Every lane of the warp reaches `collective`; returns when all have.
void warp_rendezvous(Collective collective) { yield(State::kWarpBarrier, collective); }

// A warp exchange: this lane publishes `bytes` of `mine`, the warp meets at `collective`, then
// read(words) sees every lane's words; a second meeting keeps any lane from overwriting its
// words (at its next exchange) before all have read them.
template <typename Read>
auto exchange(Collective collective, const void* mine, std::size_t bytes, Read read) {
  Warp& w = current_block->warps[linear_thread() / kWarpSize];
  std::memcpy(w.words[linear_thread() % kWarpSize], mine, bytes);
  warp_rendezvous(collective);
  auto result = read(static_cast<const uint32_t(*)[kSlotWords]>(w.words));
  warp_rendezvous(Collective::kRelease);
  return result;
}

// Lands a group's copies; a destination that no longer holds the poison cp_async wrote was
// stored to while its copy was in flight (a race on the GPU).
void complete(std::vector<Copy>& group) {
  for (const Copy& c : group) {
    const auto* bytes = static_cast<const unsigned char*>(c.dst);
    for (std::size_t i = 0; i < c.bytes; ++i) {
      if (bytes[i] != 0xff) {
        throw std::runtime_error("echo_emu: shared memory written while a cp.async into it was in flight");
      }
    }
    std::memcpy(c.dst, c.src, c.bytes);
  }
  group.clear();
}

void fiber_main() {
  Fiber& f = self();
  // An exception must not unwind past the fiber's entry (there is no frame to catch it): keep it
  // for the scheduler, and end this thread.
  try {
    (*current_block->body)();
    cp_async_wait(0);  // a thread that exits with copies in flight: they still land (as on the GPU)
  } catch (...) {
    if (!current_block->error) current_block->error = std::current_exception();
  }
  f.state = State::kDone;
}

std::string describe(const Block& block) {
  std::ostringstream out;
  out << "block (" << block.index.x << ", " << block.index.y << ", " << block.index.z << "), thread states:";
  for (std::size_t i = 0; i < block.fibers.size(); ++i) {
    const Fiber& f = block.fibers[i];
    out << (i % kWarpSize == 0 ? " | " : " ")
        << (f.state == State::kDone            ? "x"
            : f.state == State::kBlockBarrier  ? "B"
            : f.state == State::kWarpBarrier   ? std::to_string(static_cast<int>(f.waiting_for))
                                               : "r");
  }
  return out.str() + " (x exited, B __syncthreads, r runnable, n waits at warp collective n)";
}

// Threads [first, last) of warp w.
std::pair<int, int> warp_threads(const Block& block, int w) {
  return {w * kWarpSize, std::min(static_cast<int>(block.fibers.size()), (w + 1) * kWarpSize)};
}

// Opens warp w's collective if all its lanes wait at it; throws if they wait at different ones.
bool release_warp(Block& block, int w) {
  const auto [first, last] = warp_threads(block, w);
  for (int t = first; t < last; ++t) {
    if (block.fibers[t].state != State::kWarpBarrier) return false;
  }
  for (int t = first; t < last; ++t) {
    if (block.fibers[t].waiting_for != block.fibers[first].waiting_for) {
      throw std::runtime_error("echo_emu: lanes of warp " + std::to_string(w) +
                               " meet at different collectives: " + describe(block));
    }
  }
  for (int t = first; t < last; ++t) block.fibers[t].state = State::kRunnable;
  return true;
}

// Runs warp w as far as it goes without the other warps: to a __syncthreads, its exit, or a
// collective some of its lanes cannot reach.
void run_warp(Block& block, int w, bool reverse_lanes) {
  const auto [first, last] = warp_threads(block, w);
  for (;;) {
    for (int n = first; n < last; ++n) {
      Fiber& f = block.fibers[reverse_lanes ? first + last - 1 - n : n];
      if (f.state != State::kRunnable) continue;
      current_fiber = &f;
      swapcontext(&block.scheduler, &f.context);
      current_fiber = nullptr;
      if (block.error) std::rethrow_exception(block.error);
    }
    if (!release_warp(block, w)) return;
  }
}

// One warp at a time, each as far ahead of the others as it can get (a missing __syncthreads
// then lets a warp read what another has not written yet); the first warp to run rotates with
// every barrier and with the block, so each warp leads some phases; the lanes of a warp run in
// rising order in even phases and falling order in odd ones. A __syncthreads opens when every
// thread waits at it.
void run_block(Block& block) {
  const int warps = static_cast<int>(block.warps.size());
  const int lead = static_cast<int>(block.index.x + block.grid.x * (block.index.y + block.grid.y * block.index.z));
  for (int phase = 0;; ++phase) {
    for (int n = 0; n < warps; ++n) run_warp(block, (lead + phase + n) % warps, phase % 2 == 1);
    bool done = true;
    bool at_barrier = true;
    for (const Fiber& f : block.fibers) {
      done = done && f.state == State::kDone;
      at_barrier = at_barrier && f.state == State::kBlockBarrier;
    }
    if (done) return;
    if (!at_barrier) throw std::runtime_error("echo_emu: deadlock, " + describe(block));
    for (Fiber& f : block.fibers) f.state = State::kRunnable;
  }
}

bool in_shared_memory(const void* p, std::size_t bytes) {
  const auto* lo = current_block->shared.data;
  const auto* q = static_cast<const unsigned char*>(p);
  return q >= lo && q + bytes <= lo + current_block->shared.size;
}

uint16_t half_bits(uint32_t word, int half) { return static_cast<uint16_t>(half ? word >> 16 : word & 0xffffu); }

float to_float(uint16_t bits, bool bf16) {
  if (bf16) {
    const uint32_t wide = uint32_t(bits) << 16;
    float x;
    std::memcpy(&x, &wide, 4);
    return x;
  }
  __half h;
  std::memcpy(&h, &bits, 2);
  return __half2float(h);
}

}  // namespace

Counters& performance_counters() { return counters; }

uint3 thread_index() { return self().index; }
uint3 block_index() { return current_block->index; }
dim3 block_dim() { return current_block->dim; }
dim3 grid_dim() { return current_block->grid; }
unsigned char* shared_memory() { return current_block->shared.data; }

void sync_threads() { yield(State::kBlockBarrier); }

void sync_warp(unsigned mask) {
  if (mask != 0xffffffffu) throw std::runtime_error("echo_emu: __syncwarp with a partial mask is not modelled");
  warp_rendezvous(Collective::kSyncWarp);
}

uint32_t shfl_xor_bits(unsigned mask, int width, uint32_t value, int lane_mask) {
  if (mask != 0xffffffffu || width != kWarpSize) {
    throw std::runtime_error("echo_emu: shuffles of part of a warp are not modelled");
  }
  return shfl_xor_bits(value, lane_mask);
}

void wmma_rendezvous() { warp_rendezvous(Collective::kWmma); }

void wmma_load_rendezvous(uint64_t digest) {
  const int l = lane();
  const bool same = exchange(Collective::kWmma, &digest, sizeof(digest), [&](const uint32_t(*words)[kSlotWords]) {
    return std::memcmp(words[l], words[0], sizeof(digest)) == 0;
  });
  if (!same) {
    throw std::runtime_error("echo_emu: lanes of a warp loaded different WMMA tiles (a missing __syncwarp before "
                             "the load, or arguments that differ between lanes)");
  }
}

uint32_t shfl_xor_bits(uint32_t value, int lane_mask) {
  const int source = (lane() ^ lane_mask) % kWarpSize;
  return exchange(Collective::kShuffle, &value, sizeof(value),
                  [&](const uint32_t(*words)[kSlotWords]) { return words[source][0]; });
}

// Fragment layouts of m16n8k16 (PTX ISA, "Matrix Fragments for mma.m16n8k16"), lane = 4 g + t,
// value = 2 register + half (the low 16 bits of a register hold the lower column or k):
// A (row-major 16 x 16): a0 (g, 2t..2t+1), a1 (g+8, 2t..), a2 (g, 2t+8..), a3 (g+8, 2t+8..);
// B (16 x 8, k x n): b0 (k = 2t..2t+1, n = g), b1 (k = 2t+8.., n = g);
// C and D (16 x 8, one float per value): c0 c1 (g, 2t..2t+1), c2 c3 (g+8, 2t..2t+1).
RowCol mma_a_element(int lane, int value) {
  const int g = lane / 4, t = lane % 4, reg = value / 2;
  return RowCol{g + 8 * (reg & 1), 2 * t + value % 2 + 8 * (reg >> 1)};
}
RowCol mma_b_element(int lane, int value) {
  const int g = lane / 4, t = lane % 4, reg = value / 2;
  return RowCol{2 * t + value % 2 + 8 * reg, g};
}
RowCol mma_c_element(int lane, int value) {
  const int g = lane / 4, t = lane % 4;
  return RowCol{g + 8 * (value / 2), 2 * t + value % 2};
}

void mma_m16n8k16(bool bf16, float& d0, float& d1, float& d2, float& d3, uint32_t a0, uint32_t a1, uint32_t a2,
                  uint32_t a3, uint32_t b0, uint32_t b1, float c0, float c1, float c2, float c3) {
  struct Operands {
    float a[16][16];
    float b[16][8];
  };
  const uint32_t mine[6] = {a0, a1, a2, a3, b0, b1};
  const Operands ops = exchange(Collective::kMma, mine, sizeof(mine), [&](const uint32_t(*words)[kSlotWords]) {
    Operands o;
    for (int other = 0; other < kWarpSize; ++other) {
      for (int value = 0; value < 8; ++value) {
        const RowCol e = mma_a_element(other, value);
        o.a[e.row][e.col] = to_float(half_bits(words[other][value / 2], value % 2), bf16);
      }
      for (int value = 0; value < 4; ++value) {
        const RowCol e = mma_b_element(other, value);
        o.b[e.row][e.col] = to_float(half_bits(words[other][4 + value / 2], value % 2), bf16);
      }
    }
    return o;
  });
  const int l = lane();
  const auto& a = ops.a;
  const auto& b = ops.b;
  const float c[4] = {c0, c1, c2, c3};
  float d[4];
  for (int value = 0; value < 4; ++value) {
    const RowCol e = mma_c_element(l, value);
    float sum = c[value];
    for (int k = 0; k < 16; ++k) sum = std::fma(a[e.row][k], b[k][e.col], sum);
    d[value] = sum;
  }
  d0 = d[0];
  d1 = d[1];
  d2 = d[2];
  d3 = d[3];
}

// Shared memory has 32 banks of 4 bytes. ldmatrix reads each 8 x 8 matrix (8 rows of 16 bytes,
// lanes 8 j .. 8 j + 7) in one phase, which is conflict-free when the rows fall in 8 different
// 16-byte bank groups; rows at the same address are one read (a broadcast), not a conflict.
void count_ldmatrix_phases(const void* const* rows) {
  for (int j = 0; j < 4; ++j) {
    bool conflict = false;
    for (int r = 0; r < 8; ++r) {
      const auto a = reinterpret_cast<uintptr_t>(rows[8 * j + r]);
      for (int earlier = 0; earlier < r; ++earlier) {
        const auto b = reinterpret_cast<uintptr_t>(rows[8 * j + earlier]);
        conflict = conflict || (a != b && (a / 16) % 8 == (b / 16) % 8);
      }
    }
    counters.ldmatrix_phases += 1;
    counters.ldmatrix_conflicted_phases += conflict;
  }
}

// ldmatrix .x4: lanes 8 j .. 8 j + 7 name the rows of matrix j; lane l receives, of each
// matrix, elements (l / 4, 2 (l % 4) + {0, 1}), or with .trans (2 (l % 4) + {0, 1}, l / 4).
void ldmatrix_x4(const void* row, uint32_t& d0, uint32_t& d1, uint32_t& d2, uint32_t& d3, bool transpose) {
  if (reinterpret_cast<uintptr_t>(row) % 16 != 0) {
    throw std::runtime_error("echo_emu: ldmatrix row not 16-byte aligned");
  }
  if (!in_shared_memory(row, 16)) {
    throw std::runtime_error("echo_emu: ldmatrix row outside the block's shared memory");
  }
  struct Fragments {
    uint32_t d[4];
  };
  const int l = lane();
  const Fragments out = exchange(Collective::kLdmatrix, &row, sizeof(row), [&](const uint32_t(*words)[kSlotWords]) {
    const void* rows[kWarpSize];
    for (int other = 0; other < kWarpSize; ++other) std::memcpy(&rows[other], words[other], sizeof(rows[other]));
    if (l == 0) count_ldmatrix_phases(rows);
    Fragments f;
    for (int j = 0; j < 4; ++j) {
      uint16_t e[2];
      for (int h = 0; h < 2; ++h) {
        const int r = transpose ? 2 * (l % 4) + h : l / 4;
        const int c = transpose ? l / 4 : 2 * (l % 4) + h;
        std::memcpy(&e[h], static_cast<const unsigned char*>(rows[8 * j + r]) + 2 * c, 2);
      }
      f.d[j] = uint32_t(e[0]) | (uint32_t(e[1]) << 16);
    }
    return f;
  });
  d0 = out.d[0];
  d1 = out.d[1];
  d2 = out.d[2];
  d3 = out.d[3];
}

void cp_async(void* dst, const void* src, std::size_t bytes) {
  if (reinterpret_cast<uintptr_t>(dst) % bytes != 0 || reinterpret_cast<uintptr_t>(src) % bytes != 0) {
    throw std::runtime_error("echo_emu: cp.async source or destination not aligned to its size");
  }
  if (!in_shared_memory(dst, bytes)) throw std::runtime_error("echo_emu: cp.async destination outside shared memory");
  std::memset(dst, 0xff, bytes);
  self().open_group.push_back(Copy{dst, src, bytes});
}

void cp_async_fence() {
  Fiber& f = self();
  f.committed.push_back(std::move(f.open_group));
  f.open_group.clear();
}

void cp_async_wait(int groups_left) {
  Fiber& f = self();
  while (static_cast<int>(f.committed.size()) > groups_left) {
    complete(f.committed.front());
    f.committed.pop_front();
  }
  if (groups_left == 0) complete(f.open_group);  // wait_all also retires uncommitted copies, last
}

void run_grid(dim3 grid, dim3 block_shape, std::size_t shared_bytes, const std::function<void()>& body) {
  const int threads = static_cast<int>(block_shape.x * block_shape.y * block_shape.z);
  if (threads <= 0 || threads > 1024) {
    throw std::runtime_error("echo_emu: a block has 1 to 1024 threads, got " + std::to_string(block_shape.x) + " x " +
                             std::to_string(block_shape.y) + " x " + std::to_string(block_shape.z));
  }
  if (grid.y > 65535 || grid.z > 65535) throw std::runtime_error("echo_emu: grid y and z must be <= 65535");
  if (current_block != nullptr) throw std::logic_error("echo_emu: nested launch");
  // One stack per thread for the whole grid: a block's threads start afresh on them.
  std::vector<std::unique_ptr<Stack>> stacks(threads);
  for (auto& stack : stacks) stack = std::make_unique<Stack>();
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) {
        Block block(shared_bytes);
        block.index = uint3{x, y, z};
        block.dim = block_shape;
        block.grid = grid;
        block.body = &body;
        block.warps.resize((threads + kWarpSize - 1) / kWarpSize);
        block.fibers.resize(threads);
        for (int t = 0; t < threads; ++t) {
          Fiber& f = block.fibers[t];
          f.index = uint3{t % block_shape.x, (t / block_shape.x) % block_shape.y, t / (block_shape.x * block_shape.y)};
          getcontext(&f.context);
          f.context.uc_stack.ss_sp = stacks[t]->bottom();
          f.context.uc_stack.ss_size = kStackBytes;
          f.context.uc_link = &block.scheduler;
          makecontext(&f.context, fiber_main, 0);
        }
        current_block = &block;
        try {
          run_block(block);
        } catch (...) {
          current_block = nullptr;
          throw;
        }
        current_block = nullptr;
      }
    }
  }
}

}  // namespace echo_emu
