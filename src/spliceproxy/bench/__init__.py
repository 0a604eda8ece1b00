"""Benchmark harness: topology, load generator, paths, metrics, gate."""
