"""HE backends behind one interface (`base.Backend`). TenSEAL (SEAL 4.3 via sealapi) is primary;
Pyfhel (SEAL 4.1, optional extra `pyfhel`, built by scripts/build_pyfhel.sh) is second.
See docs/BACKENDS.md for the differences and why data does not cross between them."""

from __future__ import annotations

import importlib.util

from heinfer.backends.base import Backend, EvalKeyBytes, galois_element
from heinfer.backends.sealwire import check_spec_backend, parse_wire_format
from heinfer.params import CKKSParams

BACKENDS = ("tenseal", "pyfhel")
DEFAULT_BACKEND = "tenseal"
_MODULES = {"tenseal": "tenseal", "pyfhel": "Pyfhel"}

PYFHEL_MISSING = (
    "the pyfhel backend needs Pyfhel 3.5.0 (optional), which publishes no wheel: build "
    "and install it with `bash scripts/build_pyfhel.sh --install` (see docs/BACKENDS.md)"
)


def backend_available(name: str) -> bool:
    """True when the backend's library can be imported (Pyfhel is an optional extra)."""
    if name not in _MODULES:
        return False
    try:
        return importlib.util.find_spec(_MODULES[name]) is not None
    except (ImportError, ValueError):
        return False


def available_backends() -> tuple[str, ...]:
    return tuple(b for b in BACKENDS if backend_available(b))


def make_backend(params: CKKSParams, name: str = DEFAULT_BACKEND) -> Backend:
    if name == "tenseal":
        from heinfer.backends.tenseal_backend import TensealBackend

        return TensealBackend(params)
    if name == "pyfhel":
        try:
            from heinfer.backends.pyfhel_backend import PyfhelBackend
        except ImportError as e:
            raise ImportError(f"{PYFHEL_MISSING} ({e})") from e
        return PyfhelBackend(params)
    raise ValueError(f"unknown backend {name!r}; available: {BACKENDS}")


def backend_name_for_spec(spec) -> str:
    """The backend a spec's `backend` tag names (untagged or unknown: the default)."""
    parsed = parse_wire_format(spec.backend)
    return parsed[0] if parsed and parsed[0] in BACKENDS else DEFAULT_BACKEND


def check_spec_supported(spec) -> None:
    """Raise ParamsMismatchError when no installed backend can talk to the server that
    published `spec` (other SEAL major.minor, or Pyfhel not installed), before any key is
    made. Cheap for TenSEAL (no SEAL context is built)."""
    from heinfer.errors import ParamsMismatchError

    name = backend_name_for_spec(spec)
    if name == "tenseal":
        from heinfer.backends.tenseal_backend import TensealBackend

        check_spec_backend(spec.backend, TensealBackend.name, TensealBackend.seal_version)
        return
    if not backend_available(name):
        raise ParamsMismatchError(f"the model is served by {spec.backend}: {PYFHEL_MISSING}")
    backend_for_spec(spec)  # Pyfhel learns its SEAL version from a context


def backend_for_spec(spec) -> Backend:
    """Client side: a backend that can talk to the server that published `spec` (the spec's
    `backend` names backend and SEAL version, e.g. 'pyfhel/seal-4.1')."""
    be = make_backend(spec.params, backend_name_for_spec(spec))
    check_spec_backend(spec.backend, be.name, be.seal_version)
    return be


__all__ = ["Backend", "EvalKeyBytes", "galois_element", "make_backend", "BACKENDS",
           "DEFAULT_BACKEND", "available_backends", "backend_available", "backend_for_spec",
           "backend_name_for_spec", "check_spec_supported"]
