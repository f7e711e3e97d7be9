// Python module of the CUDA extension: build facts and the attention kernels' entry points.
#include <torch/extension.h>

#include <algorithm>
#include <string>
#include <vector>

#include "cuda/vrope_params.h"

int echo_cuda_runtime_version();
std::vector<int> echo_cuda_arch_list();

namespace echo {
namespace vrope {
// vrope_api.cpp
void forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::vector<at::Tensor>& fq,
             const std::vector<at::Tensor>& fk, const at::Tensor& alpha, const at::Tensor& beta,
             const at::Tensor& q_lengths, const at::Tensor& k_lengths, int64_t bias, bool causal, double scale,
             at::Tensor& out, at::Tensor& lse);
void backward(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
              const at::Tensor& out, const at::Tensor& lse, const std::vector<at::Tensor>& fq,
              const std::vector<at::Tensor>& fk, const at::Tensor& alpha, const at::Tensor& beta,
              const at::Tensor& q_lengths, const at::Tensor& k_lengths, int64_t bias, bool causal, double scale,
              at::Tensor& dq, at::Tensor& dk, at::Tensor& dv, const std::vector<at::Tensor>& q_parts,
              const std::vector<at::Tensor>& k_parts, at::Tensor& delta);
}  // namespace vrope
}  // namespace echo

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
  info["cuda_runtime"] = echo_cuda_runtime_version();
#ifdef __CUDACC_VER_MAJOR__
  info["nvcc"] = std::to_string(__CUDACC_VER_MAJOR__) + "." + std::to_string(__CUDACC_VER_MINOR__);
#endif
  info["arch_list"] = echo_cuda_arch_list();
  info["mma"] = "wmma (mma.sync 16x16x16, fp32 accumulate); opt-in forward and backward: CuTe SM80 m16n8k16";
  info["tile"] = 64;
  info["head_dims"] = pybind11::make_tuple(64, 128);
  pybind11::dict shared;
  for (int dim : {64, 128}) {
    shared[pybind11::int_(dim)] = std::max({echo::vrope::forward_shared_memory_bytes(dim),
                                            echo::vrope::forward_mma_shared_memory_bytes(dim),
                                            echo::vrope::backward_mma_shared_memory_bytes(dim),
                                            echo::vrope::backward_shared_memory_bytes(dim)});
  }
  info["shared_memory_bytes"] = shared;
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "echo_kernels fused CUDA kernels";
  m.def("build_info", &build_info, "How this extension was compiled");
  m.def("forward", &echo::vrope::forward,
        "forward(q, k, v, fq, fk, alpha, beta, q_lengths, k_lengths, bias, causal, scale, out, lse): "
        "writes out and lse in place");
  m.def("backward", &echo::vrope::backward,
        "backward(dout, q, k, v, out, lse, fq, fk, alpha, beta, q_lengths, k_lengths, bias, causal, scale, "
        "dq, dk, dv, q_parts[5], k_parts[3], delta): writes every gradient buffer in place");
}
