// Python module of the CPU extension: build facts and the fused vRoPE attention kernels
// (declared in vrope_common.h, implemented in attention_fwd.cpp / attention_bwd.cpp).
#include <torch/extension.h>

#include "vrope_common.h"

#include <string>

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
  info["compiler"] = std::string(__VERSION__);
#ifdef _OPENMP
  info["openmp"] = _OPENMP;
#else
  info["openmp"] = 0;
#endif
#if defined(__AVX512F__)
  info["simd"] = "avx512";
#elif defined(__AVX2__)
  info["simd"] = "avx2";
#elif defined(__SSE4_2__)
  info["simd"] = "sse4.2";
#else
  info["simd"] = "generic";
#endif
  info["torch_parallel_threads"] = at::get_num_threads();
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "echo_kernels fused CPU kernels";
  m.def("build_info", &build_info, "How this extension was compiled");
  m.def("poisoning", &vrope::poisoning, "Whether ECHO_KERNELS_POISON=1 (outputs NaN-filled before the kernels write them)");
  m.def("forward", &vrope::forward,
        "Fused vRoPE attention forward -> [out [B, H, Tq, D], lse [B, H, Tq]]. Features are lists of the 5 "
        "PitchFeatures tensors; bias 0 none / 1 exp / 2 l1.",
        pybind11::arg("q"), pybind11::arg("k"), pybind11::arg("v"), pybind11::arg("fq"), pybind11::arg("fk"),
        pybind11::arg("alpha"), pybind11::arg("beta"), pybind11::arg("q_lengths"), pybind11::arg("k_lengths"),
        pybind11::arg("bias"), pybind11::arg("causal"), pybind11::arg("scale"));
  m.def("backward", &vrope::backward,
        "Fused vRoPE attention backward -> the 11 gradients of echo_kernels.chunked.Grads, in order.",
        pybind11::arg("dout"), pybind11::arg("q"), pybind11::arg("k"), pybind11::arg("v"), pybind11::arg("out"),
        pybind11::arg("lse"), pybind11::arg("fq"), pybind11::arg("fk"), pybind11::arg("alpha"),
        pybind11::arg("beta"), pybind11::arg("q_lengths"), pybind11::arg("k_lengths"), pybind11::arg("bias"),
        pybind11::arg("causal"), pybind11::arg("scale"));
}
