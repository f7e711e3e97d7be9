// Proves the nvcc toolchain in every build, before the attention kernels exist.
#include <cuda_runtime.h>

int echo_cuda_runtime_version() { return CUDART_VERSION; }
