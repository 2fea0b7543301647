"""HE backends behind one interface (`base.Backend`). TenSEAL (SEAL 4.3 via sealapi) is primary."""

from __future__ import annotations

from heinfer.backends.base import Backend, EvalKeyBytes, galois_element
from heinfer.params import CKKSParams

BACKENDS = ("tenseal",)


def make_backend(params: CKKSParams, name: str = "tenseal") -> Backend:
    if name == "tenseal":
        from heinfer.backends.tenseal_backend import TensealBackend

        return TensealBackend(params)
    raise ValueError(f"unknown backend {name!r}; available: {BACKENDS}")


__all__ = ["Backend", "EvalKeyBytes", "galois_element", "make_backend", "BACKENDS"]
