"""Benchmarks, run as modules from the repository root: python -m bench.train_step | moe_layer | kernels."""
