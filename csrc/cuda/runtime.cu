// Build facts that only nvcc knows: the CUDA runtime version and the architectures compiled.
#include <cuda_runtime.h>

#include <vector>

int echo_cuda_runtime_version() { return CUDART_VERSION; }

// The -gencode architectures of this build (e.g. {800, 900}); empty if nvcc does not say.
std::vector<int> echo_cuda_arch_list() {
#ifdef __CUDA_ARCH_LIST__
  return {__CUDA_ARCH_LIST__};
#else
  return {};
#endif
}
