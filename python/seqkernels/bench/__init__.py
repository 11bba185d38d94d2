"""Benchmark harness and suites behind `seqkernels bench` (DESIGN §7)."""
