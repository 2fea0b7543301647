"""Backend over TenSEAL's `sealapi` (raw SEAL 4.3 bindings shipped with tenseal 0.3.18).

TenSEAL's high-level API has no rotations and no level control, so everything here goes through
`tenseal.sealapi`. sealapi's save/load take file paths only, hence the temporary files.
Everything a client sends is *seeded* (symmetric encryption, seeded key generation): SEAL then
stores the seed of the uniformly random half instead of the half itself (about half the bytes).
"""

from __future__ import annotations

import copy
import os
import shutil
import struct
import tempfile
import weakref
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import tenseal.sealapi as seal

from heinfer.backends.base import (
    Ciphertext,
    EvalKeyBytes,
    Plaintext,
    check_encode_scale,
    check_rescale,
    check_room,
    check_same_level_and_scale,
    galois_element,
    secret_key_bound,
)
from heinfer.backends.sealwire import check_seal_bytes, wire_format
from heinfer.errors import (
    MissingKeyError,
    ParamsMismatchError,
    ScaleMismatchError,
    SecretKeyError,
    SerializationError,
)
from heinfer.params import CKKSParams

SEAL_VERSION = "4.3"


class _TempFiles:
    """One private temporary directory for sealapi's path-only save/load."""

    def __init__(self) -> None:
        self._dir = tempfile.mkdtemp(prefix="heinfer-seal-")
        self._path = os.path.join(self._dir, "obj")
        weakref.finalize(self, shutil.rmtree, self._dir, True)

    def dump(self, obj) -> bytes:
        obj.save(self._path)
        return Path(self._path).read_bytes()

    def load_into(self, obj, context, data: bytes):
        Path(self._path).write_bytes(data)
        obj.load(context, self._path)
        return obj


class TensealBackend:
    """CKKS over SEAL via tenseal.sealapi. Built without a secret key on the server
    (`TensealBackend(params)` + `load_eval_keys`), with one on the client (`generate_keys`)."""

    name = "tenseal"
    seal_version = tuple(int(v) for v in SEAL_VERSION.split("."))
    wire_format = wire_format(name, seal_version)

    def __init__(self, params: CKKSParams):
        self.params = params
        parms = seal.EncryptionParameters(seal.SCHEME_TYPE.CKKS)
        parms.set_poly_modulus_degree(params.poly_modulus_degree)
        parms.set_coeff_modulus(
            seal.CoeffModulus.Create(params.poly_modulus_degree, list(params.coeff_mod_bits))
        )
        # Security is enforced by CKKSParams (with an explicit insecure opt-in), so SEAL's own
        # check is relaxed only when the caller asked for insecure test parameters.
        sec = seal.SEC_LEVEL_TYPE.NONE if params.insecure else seal.SEC_LEVEL_TYPE.TC128
        self.context = seal.SEALContext(parms, True, sec)
        if not self.context.parameters_set():
            raise ParamsMismatchError(
                f"SEAL rejected {params.describe()}: {self.context.parameters_error_message()}"
            )
        self.encoder = seal.CKKSEncoder(self.context)
        self.evaluator = seal.Evaluator(self.context)
        self._files = _TempFiles()
        # level -> parms_id and data prime, parms_id -> level
        self._parms_by_level: dict[int, list[int]] = {}
        self._prime_by_level: dict[int, int] = {}
        self._level_by_parms: dict[tuple[int, ...], int] = {}
        data = self.context.first_context_data()
        while data is not None:
            level = data.chain_index()
            pid = list(data.parms_id())
            self._parms_by_level[level] = pid
            self._level_by_parms[tuple(pid)] = level
            self._prime_by_level[level] = data.parms().coeff_modulus()[-1].value()
            data = data.next_context_data()
        self.relin_keys: seal.RelinKeys | None = None
        self.galois_keys: seal.GaloisKeys | None = None
        self.rotation_steps: set[int] = set()
        self.public_key: seal.PublicKey | None = None  # the client's, to sanitize outputs
        self._zero_encryptor = None
        self._secret_key = None
        self._encryptor = None
        self._decryptor = None

    # -- properties ---------------------------------------------------------------------
    @property
    def slots(self) -> int:
        return self.params.slots

    def level(self, ct: Ciphertext) -> int:
        return self._level_by_parms[tuple(ct.parms_id())]

    def scale_of(self, ct: Ciphertext) -> float:
        return ct.scale

    def prime(self, level: int) -> int:
        return self._prime_by_level[level]

    def seal_layout(self) -> dict:
        """What a serialized object for these parameters must carry, for the server's exact
        checks before SEAL parses anything (heinfer_server.seal_format): the SEAL version, the
        ring degree, every prime in key-level order (data primes, then the special one), and
        each level's parms_id as SEAL writes it (32 bytes; index = level, the key level last)."""
        key = self.context.key_context_data()
        levels = [struct.pack("<4Q", *self._parms_by_level[lv])
                  for lv in sorted(self._parms_by_level)]
        return {"version": self.seal_version, "n": self.params.poly_modulus_degree,
                "key_primes": [m.value() for m in key.parms().coeff_modulus()],
                "level_parms_ids": levels + [struct.pack("<4Q", *key.parms_id())]}

    # -- keys -----------------------------------------------------------------------------
    def generate_keys(self, rotation_steps: Iterable[int]) -> EvalKeyBytes:
        """Client side: make a secret key and the evaluation keys for exactly these steps."""
        keygen = seal.KeyGenerator(self.context)
        self._secret_key = keygen.secret_key()
        self._encryptor = seal.Encryptor(self.context, self._secret_key)
        self._decryptor = seal.Decryptor(self.context, self._secret_key)
        keys = self.make_eval_keys(rotation_steps)
        self.load_eval_keys(keys)  # the client can evaluate too (tests, local runs)
        return keys

    def make_eval_keys(self, rotation_steps: Iterable[int]) -> EvalKeyBytes:
        """Client side: fresh evaluation keys from the secret key this backend holds (a key
        store keeps only the small secret key)."""
        if self._secret_key is None:
            raise SecretKeyError("making evaluation keys needs the client's secret key")
        keygen = seal.KeyGenerator(self.context, self._secret_key)
        steps = sorted({s % self.slots for s in rotation_steps} - {0})
        relin = self._files.dump(keygen.create_relin_keys())
        elements = [galois_element(s, self.params.poly_modulus_degree) for s in steps]
        galois = self._files.dump(keygen.create_galois_keys(elements)) if steps else b""
        return EvalKeyBytes(relin_keys=relin, galois_keys=galois, rotation_steps=steps)

    def _load_section(self, cls, data: bytes, what: str):
        """One uploaded key section: refused if it is a secret key (a SecretKey never loads as
        another key type, see server/keycheck.py), else loaded as `cls` under the params."""
        check_seal_bytes(data, self.seal_version, self.name, what)
        if len(data) <= secret_key_bound(self.params):
            try:
                self._files.load_into(seal.SecretKey(), self.context, data)
            except (RuntimeError, ValueError):
                pass
            else:
                raise SecretKeyError(f"the {what} hold a SEAL secret key; only public "
                                     "evaluation keys may leave the client")
        try:
            return self._files.load_into(cls(), self.context, data)
        except (RuntimeError, ValueError) as e:
            raise ParamsMismatchError(
                f"the {what} do not load under {self.params.describe()}: made for other "
                f"parameters, or corrupted ({e})") from e

    def load_eval_keys(self, keys: EvalKeyBytes, public_key: bytes | None = None) -> None:
        """Server side: load and check relinearization and Galois keys (seeded bytes from a
        client) and, when sent, the client's public key (kept: outputs are re-randomized with
        it, heinfer.sanitize).
        Raises SecretKeyError (a section is a secret key), ParamsMismatchError (a section does
        not load under the params, or another SEAL version wrote it) and MissingKeyError (no key
        for power 2 or for one of `keys.rotation_steps`); nothing is kept on failure."""
        # foreign SEAL versions are refused before SEAL parses anything (docs/BACKENDS.md)
        relin = self._load_section(seal.RelinKeys, keys.relin_keys, "relinearization keys")
        galois = (self._load_section(seal.GaloisKeys, keys.galois_keys, "Galois keys")
                  if keys.galois_keys else None)
        pk = self._load_section(seal.PublicKey, public_key, "public key") if public_key else None
        if not relin.has_key(2):
            raise MissingKeyError("the relinearization keys hold no key for power 2")
        steps = sorted({s % self.slots for s in keys.rotation_steps} - {0})
        n = self.params.poly_modulus_degree
        missing = [s for s in steps if galois is None or not galois.has_key(galois_element(s, n))]
        if missing:
            raise MissingKeyError(f"no Galois key for rotation step(s) {missing}")
        self.relin_keys, self.galois_keys = relin, galois
        self.rotation_steps = set(steps)
        self.public_key, self._zero_encryptor = pk, None

    def with_eval_keys(self, keys: EvalKeyBytes,
                       public_key: bytes | None = None) -> TensealBackend:
        """A backend sharing this one's SEAL context (so plaintexts encoded here work with it)
        that holds `keys` (checked as in `load_eval_keys`) and no secret key: one per session
        on a server. Not thread-safe together with this one (shared temporary files)."""
        out = copy.copy(self)
        out.relin_keys = out.galois_keys = out.public_key = None
        out._secret_key = out._encryptor = out._decryptor = None
        out.load_eval_keys(keys, public_key)
        return out

    def drop_eval_keys(self) -> None:
        self.relin_keys = self.galois_keys = None
        self.rotation_steps = set()

    def public_key_bytes(self) -> bytes:
        """Client side: the public key for the server's sanitizing of outputs
        (heinfer.sanitize): public material, uploaded with the evaluation keys. (sealapi
        cannot return SEAL's seeded form of it: twice the size of a fresh ciphertext.)"""
        if self._secret_key is None:
            raise SecretKeyError("making the public key needs the client's secret key")
        pk = seal.PublicKey()
        seal.KeyGenerator(self.context, self._secret_key).create_public_key(pk)
        return self._files.dump(pk)

    def load_public_key(self, data: bytes) -> None:
        """Server side: the client's public key alone (checked like the other keys)."""
        self.public_key = self._load_section(seal.PublicKey, data, "public key")
        self._zero_encryptor = None

    def encrypt_zero_like(self, ct: Ciphertext) -> Ciphertext:
        """A fresh encryption of zero under the client's public key, at ct's level and scale
        (SEAL's CSPRNG): added to an output, it re-randomizes it."""
        if self.public_key is None:
            raise MissingKeyError("re-randomizing an output needs the client's public key")
        if getattr(self, "_zero_encryptor", None) is None:
            self._zero_encryptor = seal.Encryptor(self.context, self.public_key)
        out = seal.Ciphertext()
        self._zero_encryptor.encrypt_zero(ct.parms_id(), out)
        out.scale = ct.scale
        return out

    def secret_key_bytes(self) -> bytes:
        """The secret key, only when asked for by name (the client stores it locally)."""
        if self._secret_key is None:
            raise SecretKeyError("this backend holds no secret key")
        return self._files.dump(self._secret_key)

    def load_secret_key(self, data: bytes) -> None:
        check_seal_bytes(data, self.seal_version, self.name, "secret key")
        self._secret_key = self._files.load_into(seal.SecretKey(), self.context, data)
        self._encryptor = seal.Encryptor(self.context, self._secret_key)
        self._decryptor = seal.Decryptor(self.context, self._secret_key)

    @property
    def has_secret_key(self) -> bool:
        return self._secret_key is not None

    # -- encode / encrypt / decrypt ------------------------------------------------------
    def encode(self, values: np.ndarray, level: int, scale: float) -> Plaintext:
        values = np.asarray(values)
        if values.shape != (self.slots,):
            raise ValueError(f"encode expects {self.slots} slot values, got {values.shape}")
        check_encode_scale(self.params, level, scale)
        pt = seal.Plaintext()
        vals = values.tolist()  # sealapi takes Python lists (complex or float)
        self.encoder.encode(vals, self._parms_by_level[level], float(scale), pt)
        return pt

    def plaintext_is_zero(self, p: Plaintext) -> bool:
        return bool(p.is_zero())

    def encode_scalar(self, value: float, level: int, scale: float) -> Plaintext:
        """A constant in every slot, encoded in microseconds (throughput mode's weights)."""
        check_encode_scale(self.params, level, scale)
        pt = seal.Plaintext()
        self.encoder.encode(float(value), self._parms_by_level[level], float(scale), pt)
        return pt

    def encrypt(self, values: np.ndarray) -> Ciphertext:
        """Symmetric (seeded-serializable) encryption at the top level and default scale."""
        if self._encryptor is None:
            raise SecretKeyError("encryption needs the client's secret key")
        pt = self.encode(values, self.params.top_level, self.params.scale)
        ct = seal.Ciphertext()
        self._encryptor.encrypt_symmetric(pt, ct)
        return ct

    def encrypt_to_bytes(self, values: np.ndarray) -> bytes:
        """Encrypt and serialize seeded: about half the bytes of a full ciphertext."""
        if self._encryptor is None:
            raise SecretKeyError("encryption needs the client's secret key")
        pt = self.encode(values, self.params.top_level, self.params.scale)
        return self._files.dump(self._encryptor.encrypt_symmetric(pt))

    def decrypt(self, ct: Ciphertext) -> np.ndarray:
        if self._decryptor is None:
            raise SecretKeyError("decryption needs the client's secret key")
        pt = seal.Plaintext()
        self._decryptor.decrypt(ct, pt)
        return np.array(self.encoder.decode_double(pt))

    def decrypt_complex(self, ct: Ciphertext) -> np.ndarray:
        """Every slot, real and imaginary parts: what a curious client can read."""
        if self._decryptor is None:
            raise SecretKeyError("decryption needs the client's secret key")
        pt = seal.Plaintext()
        self._decryptor.decrypt(ct, pt)
        return np.array(self.encoder.decode_complex(pt))

    # -- evaluation -----------------------------------------------------------------------
    def _check_same(self, a: Ciphertext, b, what: str) -> None:
        check_same_level_and_scale(what, self.level(a),
                                   self._level_by_parms.get(tuple(b.parms_id())), a.scale,
                                   b.scale)

    def _check_room(self, level: int, scale: float, what: str) -> None:
        check_room(self.params, level, scale, what)

    def add(self, a: Ciphertext, b: Ciphertext) -> Ciphertext:
        self._check_same(a, b, "add")
        out = seal.Ciphertext()
        self.evaluator.add(a, b, out)
        return out

    def add_inplace(self, a: Ciphertext, b: Ciphertext) -> None:
        self._check_same(a, b, "add")
        self.evaluator.add_inplace(a, b)

    def sub(self, a: Ciphertext, b: Ciphertext) -> Ciphertext:
        self._check_same(a, b, "sub")
        out = seal.Ciphertext()
        self.evaluator.sub(a, b, out)
        return out

    def add_plain_inplace(self, a: Ciphertext, p: Plaintext) -> None:
        self._check_same(a, p, "add_plain")
        self.evaluator.add_plain_inplace(a, p)

    def multiply_plain(self, a: Ciphertext, p: Plaintext) -> Ciphertext:
        level = self.level(a)
        if self._level_by_parms.get(tuple(p.parms_id())) != level:
            raise ScaleMismatchError(
                f"multiply_plain: plaintext encoded for another level than the ciphertext's "
                f"({level})"
            )
        self._check_room(level, a.scale * p.scale, "multiply_plain")
        out = seal.Ciphertext()
        self.evaluator.multiply_plain(a, p, out)
        return out

    def multiply(self, a: Ciphertext, b: Ciphertext) -> Ciphertext:
        if self.relin_keys is None:
            raise MissingKeyError("ciphertext multiplication needs relinearization keys")
        if self.level(a) != self.level(b):
            raise ScaleMismatchError(f"multiply: operands at levels {self.level(a)} and "
                                     f"{self.level(b)}")
        self._check_room(self.level(a), a.scale * b.scale, "multiply")
        out = seal.Ciphertext()
        self.evaluator.multiply(a, b, out)
        self.evaluator.relinearize_inplace(out, self.relin_keys)
        return out

    def square(self, a: Ciphertext) -> Ciphertext:
        if self.relin_keys is None:
            raise MissingKeyError("ciphertext multiplication needs relinearization keys")
        self._check_room(self.level(a), a.scale * a.scale, "square")
        out = seal.Ciphertext()
        self.evaluator.square(a, out)
        self.evaluator.relinearize_inplace(out, self.relin_keys)
        return out

    def rescale_inplace(self, a: Ciphertext) -> None:
        check_rescale(self.params, self.level(a), a.scale,
                      self.prime(self.level(a)) if self.level(a) else 0)
        self.evaluator.rescale_to_next_inplace(a)

    def mod_switch_to_inplace(self, a: Ciphertext, level: int) -> None:
        if level > self.level(a):
            raise ScaleMismatchError(f"cannot mod-switch up from level {self.level(a)} to {level}")
        if level < self.level(a):
            self.evaluator.mod_switch_to_inplace(a, self._parms_by_level[level])

    def rotate(self, a: Ciphertext, step: int) -> Ciphertext:
        step %= self.slots
        out = seal.Ciphertext()
        if step == 0:
            return self.copy(a)
        if self.galois_keys is None or step not in self.rotation_steps:
            raise MissingKeyError(
                f"no Galois key for rotation step {step}; keys were made for steps "
                f"{sorted(self.rotation_steps)}"
            )
        self.evaluator.rotate_vector(a, step, self.galois_keys, out)
        return out

    def copy(self, a: Ciphertext) -> Ciphertext:
        # sealapi binds no copy constructor; negating twice copies at the cost of two cheap passes
        out = seal.Ciphertext()
        self.evaluator.negate(a, out)
        self.evaluator.negate_inplace(out)
        return out

    # -- bytes ----------------------------------------------------------------------------
    def ciphertext_to_bytes(self, ct: Ciphertext) -> bytes:
        return self._files.dump(ct)

    def ciphertext_from_bytes(self, data: bytes) -> Ciphertext:
        check_seal_bytes(data, self.seal_version, self.name, "ciphertext")
        try:
            ct = self._files.load_into(seal.Ciphertext(), self.context, data)
        except (RuntimeError, ValueError) as e:
            raise SerializationError(
                f"not a ciphertext for {self.params.describe()}: {e}"
            ) from e
        if tuple(ct.parms_id()) not in self._level_by_parms:
            raise ParamsMismatchError("ciphertext made under other parameters")
        return ct
