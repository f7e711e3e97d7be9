// Python module of the CUDA extension: build facts; kernels add their bindings.
#include <torch/extension.h>

#include <string>

int echo_cuda_runtime_version();

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
  info["cuda_runtime"] = echo_cuda_runtime_version();
#ifdef __CUDACC_VER_MAJOR__
  info["nvcc"] = std::to_string(__CUDACC_VER_MAJOR__) + "." + std::to_string(__CUDACC_VER_MINOR__);
#endif
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "echo_kernels fused CUDA kernels";
  m.def("build_info", &build_info, "How this extension was compiled");
}
