// Python module of the CPU extension: build facts here; kernels register their own
// bindings through the functions declared in bindings.h.
#include <torch/extension.h>

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
}
