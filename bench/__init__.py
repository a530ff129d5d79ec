"""Benchmarks against the PyTorch reference; each prints one JSON line (see bench/common.py)."""
