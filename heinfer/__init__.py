"""heinfer: the CKKS runtime shared by client and server (backends, layouts, kernels, plans)."""

__version__ = "0.1.0"
