"""heinfer: CKKS runtime shared by the heinfer client and server (backends, layouts, kernels, plans)."""

__version__ = "0.1.0"
