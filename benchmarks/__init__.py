"""Benchmarks: each prints a table and a last line starting with RESULT."""
