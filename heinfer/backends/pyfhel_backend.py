"""Backend over Pyfhel 3.5.0 (bundles Microsoft SEAL 4.1), the optional second backend.

Same contract as `TensealBackend`: levels count down from `params.top_level` to 0,
`encode(values, level, scale)` at an exact scale, `prime(level)` = the prime a rescale at that
level drops, Galois keys only for the listed rotation steps, the same `heinfer.errors`.

Pyfhel publishes no wheel for 3.5.0: build it with `scripts/build_pyfhel.sh --install`
(see docs/BACKENDS.md). Differences from TenSEAL that its API imposes, all documented there:

- Pyfhel exposes public-key encryption only and key generation into out-parameters, so nothing
  it writes is *seeded*: fresh ciphertexts and evaluation keys are full size (about twice
  TenSEAL's seeded bytes; both are zstd-compressed).
- Pyfhel's own `mod_level` counter is advisory (a multiply bumps it, a rescale does not), so the
  level here is read from SEAL itself: a ciphertext's serialized size without compression is
  exactly `size * n * (level + 1)` words plus a header of fewer than `size * n` words.
- Pyfhel encodes at the top of the chain only; `encode` mod-switches the plaintext down to the
  requested level (dropping RNS limbs leaves the integers unchanged: the same plaintext SEAL
  encodes at that level directly).
- Its rotate() silently generates every power-of-two key when it has none: never reached here,
  steps are checked against the loaded keys first.
- Resuming a client needs the public key too (Pyfhel cannot encrypt with the secret key), so
  `secret_key_bytes` frames both.
"""

from __future__ import annotations

import struct
import warnings
from collections.abc import Iterable

import numpy as np
from Pyfhel import PyCtxt, Pyfhel, PyPtxt

from heinfer.backends.base import (
    Ciphertext,
    EvalKeyBytes,
    check_encode_scale,
    check_rescale,
    check_room,
    check_same_level_and_scale,
    secret_key_bound,
)
from heinfer.backends.sealwire import check_seal_bytes, read_seal_header, wire_format
from heinfer.errors import (
    DepthExhaustedError,
    MissingKeyError,
    ParamsMismatchError,
    ScaleMismatchError,
    SecretKeyError,
    SerializationError,
)
from heinfer.params import CKKSParams

COMPR = "zstd"  # what SEAL (and so TenSEAL's sealapi) writes by default
# exceptions a C++ error in Pyfhel surfaces as (Cython's `except +` translation)
_SEAL_ERRORS = (RuntimeError, ValueError, TypeError, MemoryError, OSError, IndexError,
                OverflowError)
_SK_MAGIC = b"heinfer-pyfhel-sk2"  # sk1 (no evaluation keys) could not resume


class PyfhelPlain:
    """A Pyfhel plaintext with the level and scale it was encoded for (opaque to kernels)."""

    __slots__ = ("pt", "level", "scale")

    def __init__(self, pt: PyPtxt, level: int, scale: float):
        self.pt, self.level, self.scale = pt, level, scale


class PyfhelBackend:
    """CKKS over SEAL 4.1 via Pyfhel. Built without a secret key on the server
    (`PyfhelBackend(params)` + `load_eval_keys`), with one on the client (`generate_keys`)."""

    name = "pyfhel"

    def __init__(self, params: CKKSParams):
        self.params = params
        self.he = Pyfhel()
        with warnings.catch_warnings():
            # Pyfhel warns when the default scale is not a sum of prime sizes; heinfer encodes
            # every plaintext at an explicit scale anyway
            warnings.simplefilter("ignore")
            status = self.he.contextGen(
                scheme="CKKS", n=params.poly_modulus_degree, scale=params.scale,
                qi_sizes=list(params.coeff_mod_bits), sec=0 if params.insecure else 128)
        status = status.decode() if isinstance(status, bytes) else str(status)
        if not status.startswith("success"):
            raise ParamsMismatchError(f"SEAL (Pyfhel) rejected {params.describe()}: {status}")
        # chain order: q0 .. q_{L-1}, special; a rescale at level l drops q_l
        self._primes = [int(q) for q in self.he.get_qi()]
        # the SEAL version Pyfhel was built with, read from the header of an object it writes
        probe = self.he.encodeFrac(np.zeros(1), scale=2.0).to_bytes(COMPR)
        self.seal_version = read_seal_header(probe, "probe").version
        self.wire_format = wire_format(self.name, self.seal_version)
        self._n = params.poly_modulus_degree
        self.rotation_steps: set[int] = set()
        self._has_relin = False
        self._has_galois = False
        self._has_sk = False
        self._has_pk = False
        self._scratch: Pyfhel | None = None
        self._layout: dict | None = None
        self._own_keygen = False  # keyGen ran here: relin/rotate keys match the secret key
        self._stored_eval: EvalKeyBytes | None = None
        self.public_key: bytes | None = None  # the client's (server side), to sanitize outputs
        # one Pyfhel object holds one key set: `with_eval_keys` loads into this backend itself
        self.shares_keys = True

    # -- properties ---------------------------------------------------------------------
    @property
    def slots(self) -> int:
        return self.params.slots

    def level(self, ct: Ciphertext) -> int:
        # SEAL's save size without compression: header fields + size * n * k words
        words = ct.sizeof_ciphertext("none") // 8
        return words // (ct.size() * self._n) - 1

    def scale_of(self, ct: Ciphertext) -> float:
        return ct.scale

    def prime(self, level: int) -> int:
        if not 0 <= level <= self.params.top_level:
            raise DepthExhaustedError(f"no level {level} in {self.params.describe()}")
        return self._primes[level]

    def seal_layout(self) -> dict:
        """As `TensealBackend.seal_layout` (the server's exact checks before SEAL parses an
        upload). Pyfhel exposes no parms_id, so each level's is read where SEAL writes it: the
        32 bytes after the header of an uncompressed ciphertext at that level (and of a public
        key: the key level), made under a scratch key on a scratch object."""
        if self._layout is None:
            he = self._fresh()
            he.keyGen()
            ct = he.encryptPtxt(he.encodeFrac(np.zeros(1), scale=2.0))
            by_level = []
            for _ in range(self.params.top_level + 1):
                by_level.append(ct.to_bytes("none")[16:48])
                if len(by_level) <= self.params.top_level:
                    he.mod_switch_to_next_ctxt(ct)
            self._layout = {"version": self.seal_version, "n": self._n,
                            "key_primes": list(self._primes),
                            "level_parms_ids": by_level[::-1]
                            + [he.to_bytes_public_key("none")[16:48]]}
        return self._layout

    # -- keys -----------------------------------------------------------------------------
    def generate_keys(self, rotation_steps: Iterable[int]) -> EvalKeyBytes:
        """Client side: make a secret key and the evaluation keys for exactly these steps."""
        self.he.keyGen()
        self._has_sk = self._has_pk = True
        self._own_keygen, self._stored_eval = True, None
        # the client can evaluate too (tests, local runs): its keys are already loaded
        return self.make_eval_keys(rotation_steps)

    def make_eval_keys(self, rotation_steps: Iterable[int]) -> EvalKeyBytes:
        """Client side: evaluation keys for the secret key this backend holds. Pyfhel makes
        them with the KeyGenerator of its last `keyGen` only (loading a secret key does not
        replace it: keys made then belong to another secret key and decrypt to garbage), so a
        loaded secret key brings the evaluation keys stored with it (`secret_key_bytes`)."""
        if not self._has_sk:
            raise SecretKeyError("making evaluation keys needs the client's secret key")
        steps = sorted({s % self.slots for s in rotation_steps} - {0})
        if not self._own_keygen:
            stored = self._stored_eval
            if stored is None or sorted(stored.rotation_steps) != steps:
                raise SecretKeyError(
                    "Pyfhel cannot make evaluation keys for a loaded secret key (it only makes "
                    "them for the key of its own keyGen), and none for these rotation steps "
                    "were stored with it: make new keys")
            return stored
        self.he.relinKeyGen()
        galois = b""
        if steps:  # an empty list would make Pyfhel generate every power-of-two key
            self.he.rotateKeyGen(steps)
            galois = self.he.to_bytes_rotate_key(COMPR)
        self._has_relin, self._has_galois = True, bool(steps)
        self.rotation_steps = set(steps)
        self._stored_eval = EvalKeyBytes(relin_keys=self.he.to_bytes_relin_key(COMPR),
                                         galois_keys=galois, rotation_steps=steps)
        return EvalKeyBytes(relin_keys=self.he.to_bytes_relin_key(COMPR), galois_keys=galois,
                            rotation_steps=steps)

    def _fresh(self) -> Pyfhel:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            he = Pyfhel()
            he.contextGen(scheme="CKKS", n=self.params.poly_modulus_degree,
                          scale=self.params.scale, qi_sizes=list(self.params.coeff_mod_bits),
                          sec=0 if self.params.insecure else 128)
        return he

    def _probe(self) -> Pyfhel:
        """A scratch Pyfhel under the same parameters: loading an upload there to test whether
        it is a secret key leaves this backend's own keys untouched."""
        if self._scratch is None:
            self._scratch = self._fresh()
        return self._scratch

    def public_key_bytes(self) -> bytes:
        """Client side: the public key, for the server's re-randomizing of outputs."""
        if not self._has_pk:
            raise SecretKeyError("making the public key needs the client's keys")
        return self.he.to_bytes_public_key(COMPR)

    def encrypt_zero_like(self, ct: Ciphertext) -> Ciphertext:
        """A fresh encryption of zero under the client's public key (loaded with the session's
        keys), at ct's level and scale: added to an output, it re-randomizes it."""
        if self.public_key is None:
            raise MissingKeyError("re-randomizing an output needs the client's public key")
        zero = self.he.encryptPtxt(self.encode(np.zeros(self.slots), self.level(ct), ct.scale).pt)
        zero.scale = ct.scale
        return zero

    def _check_section(self, data: bytes, what: str) -> None:
        check_seal_bytes(data, self.seal_version, self.name, what)
        if len(data) <= secret_key_bound(self.params):
            try:
                self._probe().from_bytes_secret_key(bytes(data))
            except _SEAL_ERRORS:
                pass
            else:
                raise SecretKeyError(f"the {what} hold a SEAL secret key; only public "
                                     "evaluation keys may leave the client")

    def load_eval_keys(self, keys: EvalKeyBytes, public_key: bytes | None = None) -> None:
        """Server side: load and check relinearization and Galois keys (bytes from a client),
        and the public key when sent (checked on a scratch object only). Errors as for
        `TensealBackend.load_eval_keys`, except that Pyfhel cannot list the Galois elements a
        key set holds: a missing rotation key shows when the rotation runs."""
        self._check_section(keys.relin_keys, "relinearization keys")
        if keys.galois_keys:
            self._check_section(keys.galois_keys, "Galois keys")
        if public_key:
            self._check_section(public_key, "public key")
            try:
                self._probe().from_bytes_public_key(bytes(public_key))
            except _SEAL_ERRORS as e:
                raise ParamsMismatchError(
                    f"the public key does not load under {self.params.describe()}: {e}") from e
        self.public_key = None
        if not self._has_sk:  # server side: the previous session's public key is not this one's
            self._has_pk = False
        steps = {s % self.slots for s in keys.rotation_steps} - {0}
        if steps and not keys.galois_keys:
            raise MissingKeyError(f"no Galois key for rotation step(s) {sorted(steps)}")
        # Pyfhel drops the keys it holds before loading new ones: a failed load leaves none
        self._has_relin = self._has_galois = False
        self.rotation_steps = set()
        try:
            self.he.from_bytes_relin_key(bytes(keys.relin_keys))
            self._has_relin = True
            if keys.galois_keys:
                self.he.from_bytes_rotate_key(bytes(keys.galois_keys))
                self._has_galois = True
            if public_key and not self._has_sk:  # server side: only to re-randomize outputs
                self.he.from_bytes_public_key(bytes(public_key))
                self._has_pk, self.public_key = True, bytes(public_key)
        except _SEAL_ERRORS as e:
            raise ParamsMismatchError(
                f"evaluation keys do not load under {self.params.describe()}: {e}"
            ) from e
        self.rotation_steps = steps

    def with_eval_keys(self, keys: EvalKeyBytes,
                       public_key: bytes | None = None) -> PyfhelBackend:
        """Pyfhel keeps keys inside its one Pyfhel object (which also owns the context the
        plaintexts were encoded under), so this loads `keys` into this backend itself: one
        pyfhel backend serves one key set at a time."""
        self.load_eval_keys(keys, public_key)
        return self

    def drop_eval_keys(self) -> None:
        self._has_relin = self._has_galois = False
        self.rotation_steps = set()

    def secret_key_bytes(self) -> bytes:
        """The secret key, framed with the public key Pyfhel needs to encrypt and the last
        evaluation keys made (Pyfhel cannot make them again for a loaded secret key), only
        when asked for by name: the client stores it locally."""
        if not self._has_sk:
            raise SecretKeyError("this backend holds no secret key")
        parts = [self.he.to_bytes_secret_key(COMPR), self.he.to_bytes_public_key(COMPR)]
        ev = self._stored_eval
        if ev is not None:
            parts += [ev.relin_keys, ev.galois_keys,
                      struct.pack(f"<{len(ev.rotation_steps)}q", *ev.rotation_steps)]
        else:
            parts += [b"", b"", b""]
        return _SK_MAGIC + struct.pack("<5Q", *map(len, parts)) + b"".join(parts)

    def load_secret_key(self, data: bytes) -> None:
        head = len(_SK_MAGIC) + 40
        if len(data) < head or not data.startswith(_SK_MAGIC):
            raise SerializationError("not a secret key written by this heinfer's pyfhel "
                                     "backend (older key stores: make new keys)")
        sizes = struct.unpack_from("<5Q", data, len(_SK_MAGIC))
        if head + sum(sizes) != len(data) or sizes[4] % 8:
            raise SerializationError("secret key bytes truncated or padded")
        parts, at = [], head
        for n in sizes:
            parts.append(bytes(data[at: at + n]))
            at += n
        sk, pk, relin, galois, steps = parts
        check_seal_bytes(sk, self.seal_version, self.name, "secret key")
        check_seal_bytes(pk, self.seal_version, self.name, "public key")
        try:
            self.he.from_bytes_secret_key(sk)
            self.he.from_bytes_public_key(pk)
        except _SEAL_ERRORS as e:
            raise ParamsMismatchError(
                f"secret key does not load under {self.params.describe()}: {e}") from e
        self._has_sk = self._has_pk = True
        self._own_keygen = False
        self._stored_eval = (EvalKeyBytes(relin, galois,
                                          list(struct.unpack(f"<{len(steps) // 8}q", steps)))
                             if relin else None)

    @property
    def has_secret_key(self) -> bool:
        return self._has_sk

    # -- encode / encrypt / decrypt ------------------------------------------------------
    def encode(self, values: np.ndarray, level: int, scale: float) -> PyfhelPlain:
        values = np.asarray(values)
        if values.shape != (self.slots,):
            raise ValueError(f"encode expects {self.slots} slot values, got {values.shape}")
        if not 0 <= level <= self.params.top_level:
            raise DepthExhaustedError(f"no level {level} in {self.params.describe()}")
        check_encode_scale(self.params, level, scale)
        if np.iscomplexobj(values):
            pt = self.he.encodeComplex(np.ascontiguousarray(values, dtype=complex),
                                       scale=float(scale))
        else:
            pt = self.he.encodeFrac(np.ascontiguousarray(values, dtype=np.float64),
                                    scale=float(scale))
        for _ in range(self.params.top_level - level):
            self.he.mod_switch_to_next_ptxt(pt, in_new_ptxt=False)
        return PyfhelPlain(pt, level, float(scale))

    def plaintext_is_zero(self, p: PyfhelPlain) -> bool:
        return bool(p.pt.is_zero())

    def encode_scalar(self, value: float, level: int, scale: float) -> PyfhelPlain:
        return self.encode(np.full(self.slots, float(value)), level, scale)

    def _require_pk(self, what: str) -> None:
        if not self._has_pk:
            raise SecretKeyError(f"{what} needs the client's keys")

    def encrypt(self, values: np.ndarray) -> Ciphertext:
        """Encryption at the top level and default scale (public-key: Pyfhel has no
        symmetric, seeded encryption)."""
        self._require_pk("encryption")
        pt = self.encode(values, self.params.top_level, self.params.scale)
        return self.he.encryptPtxt(pt.pt)

    def encrypt_to_bytes(self, values: np.ndarray) -> bytes:
        """Encrypt and serialize (zstd; full size, not seeded)."""
        return self.ciphertext_to_bytes(self.encrypt(values))

    def decrypt(self, ct: Ciphertext) -> np.ndarray:
        if not self._has_sk:
            raise SecretKeyError("decryption needs the client's secret key")
        return np.asarray(self.he.decryptFrac(ct), dtype=np.float64)[: self.slots]

    # -- evaluation -----------------------------------------------------------------------
    def _check_same(self, a: Ciphertext, b, what: str) -> None:
        if isinstance(b, PyfhelPlain):
            lb, sb = b.level, b.scale
        else:
            lb, sb = self.level(b), b.scale
        check_same_level_and_scale(what, self.level(a), lb, a.scale, sb)

    def _check_room(self, level: int, scale: float, what: str) -> None:
        check_room(self.params, level, scale, what)

    def add(self, a: Ciphertext, b: Ciphertext) -> Ciphertext:
        self._check_same(a, b, "add")
        return self.he.add(a, b, in_new_ctxt=True)

    def add_inplace(self, a: Ciphertext, b: Ciphertext) -> None:
        self._check_same(a, b, "add")
        self.he.add(a, b)

    def sub(self, a: Ciphertext, b: Ciphertext) -> Ciphertext:
        self._check_same(a, b, "sub")
        return self.he.sub(a, b, in_new_ctxt=True)

    def add_plain_inplace(self, a: Ciphertext, p: PyfhelPlain) -> None:
        self._check_same(a, p, "add_plain")
        self.he.add_plain(a, p.pt)

    def multiply_plain(self, a: Ciphertext, p: PyfhelPlain) -> Ciphertext:
        level = self.level(a)
        if p.level != level:
            raise ScaleMismatchError(
                f"multiply_plain: plaintext encoded for another level than the ciphertext's "
                f"({level})"
            )
        self._check_room(level, a.scale * p.scale, "multiply_plain")
        return self.he.multiply_plain(a, p.pt, in_new_ctxt=True)

    def _require_relin(self) -> None:
        if not self._has_relin:
            raise MissingKeyError("ciphertext multiplication needs relinearization keys")

    def multiply(self, a: Ciphertext, b: Ciphertext) -> Ciphertext:
        self._require_relin()
        la, lb = self.level(a), self.level(b)
        if la != lb:
            raise ScaleMismatchError(f"multiply: operands at levels {la} and {lb}")
        self._check_room(la, a.scale * b.scale, "multiply")
        out = self.he.multiply(a, b, in_new_ctxt=True)
        self.he.relinearize(out)
        return out

    def square(self, a: Ciphertext) -> Ciphertext:
        self._require_relin()
        self._check_room(self.level(a), a.scale * a.scale, "square")
        out = self.he.square(a, in_new_ctxt=True)
        self.he.relinearize(out)
        return out

    def rescale_inplace(self, a: Ciphertext) -> None:
        check_rescale(self.params, self.level(a), a.scale,
                      self.prime(self.level(a)) if self.level(a) else 0)
        self.he.rescale_to_next(a)

    def mod_switch_to_inplace(self, a: Ciphertext, level: int) -> None:
        current = self.level(a)
        if level > current:
            raise ScaleMismatchError(f"cannot mod-switch up from level {current} to {level}")
        if level < 0:
            raise DepthExhaustedError(f"no level {level} in {self.params.describe()}")
        for _ in range(current - level):
            self.he.mod_switch_to_next_ctxt(a)

    def rotate(self, a: Ciphertext, step: int) -> Ciphertext:
        step %= self.slots
        if step == 0:
            return self.copy(a)
        if not self._has_galois or step not in self.rotation_steps:
            raise MissingKeyError(
                f"no Galois key for rotation step {step}; keys were made for steps "
                f"{sorted(self.rotation_steps)}"
            )
        return self.he.rotate(a, step, in_new_ctxt=True)

    def copy(self, a: Ciphertext) -> Ciphertext:
        return a.copy()

    # -- bytes ----------------------------------------------------------------------------
    def ciphertext_to_bytes(self, ct: Ciphertext) -> bytes:
        return ct.to_bytes(COMPR)

    def ciphertext_from_bytes(self, data: bytes) -> Ciphertext:
        check_seal_bytes(data, self.seal_version, self.name, "ciphertext")
        ct = PyCtxt(pyfhel=self.he)
        try:
            ct.from_bytes(bytes(data), "CKKS")
        except _SEAL_ERRORS as e:
            raise SerializationError(
                f"not a ciphertext for {self.params.describe()}: {e}"
            ) from e
        if not 0 <= self.level(ct) <= self.params.top_level:
            raise ParamsMismatchError("ciphertext made under other parameters")
        return ct
