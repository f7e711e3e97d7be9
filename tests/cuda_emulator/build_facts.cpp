// What csrc/cuda/runtime.cu reports under nvcc, for the emulated build: no CUDA runtime, no arch.
#include <vector>

int echo_cuda_runtime_version() { return 0; }

std::vector<int> echo_cuda_arch_list() { return {}; }
