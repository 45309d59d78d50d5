"""Micro-benchmarks of the hot path (pytest-benchmark); a package so relayd imports."""
