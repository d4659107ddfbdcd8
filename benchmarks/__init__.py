"""ke_tf benchmarks: engine throughput, split-mask overhead, gradient-accumulation memory,
pruned/slim/fused inference speed-ups, input-pipeline rate and multi-replica overhead.

Every benchmark reports a *ratio* measured in one run (warm-up, then the median of repeated,
interleaved timings) so results are comparable across machines. Run `python -m benchmarks.run`.
"""
