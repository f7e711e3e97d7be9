"""pytest-benchmark suites for echo_kernels (`pytest benchmarks/ --benchmark`)."""
