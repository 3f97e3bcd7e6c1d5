"""cai-ray throughput benchmarks (see BENCHMARKING notes in the README)."""
