"""Benchmark harness: the real pipeline (arm C) against a raw aiokafka passthrough (arm A).

`python -m bench.run` (or `make bench`) runs both arms interleaved on the same broker and input,
measures drain throughput, open-loop latency and peak RSS, and writes `bench/results/*.json`.
See docs/benchmarks.md for the method.
"""
