"""Benchmarks for tripo-watchd; not part of the test suite."""
