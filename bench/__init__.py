"""Benchmarks for npdraw: one training step, raced against a plain PyTorch peer.

``python bench/run.py --help`` from the repository root; see bench/README.md.
"""
