"""Accelerator kernels, each behind a plain function with an XLA reference."""
