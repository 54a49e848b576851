"""fastalign: a kernel-accelerated, padding-free training engine for aligning language models."""

__version__ = "0.1.0"
