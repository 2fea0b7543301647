"""SEAL objects parsed field by field and checked exactly against the plan, before SEAL sees them.

SEAL's loaders accept objects the server cannot use (a ciphertext of size 0, a scale 1 ulp off,
another level) and fail later with exceptions that say nothing to a client. So every byte the
server relies on is read here first, from the serialization of SEAL 4.x:

    SEALHeader     u16 magic 0xA15E | u8 header size 16 | u8 major | u8 minor |
                   u8 compression (0 none, 1 zlib, 2 zstd) | u16 reserved 0 | u64 total size
    Ciphertext     header | parms_id (4 x u64) | u8 NTT form | u64 size | u64 ring degree N |
                   u64 number of primes k | f64 scale | u64 correction factor |
                   DynArray (header, compression none | u64 count | count x u64) |
                   [seeded: UniformRandomGeneratorInfo (header | u8 prng type | 64-byte seed)]
    PublicKey      a Ciphertext
    RelinKeys,     header | parms_id | u64 dim1 | dim1 x (u64 dim2 | dim2 x PublicKey)
    GaloisKeys     (nested objects are written uncompressed)
    SecretKey      a Plaintext: header | parms_id | u64 coeff count | f64 scale | DynArray

The members after the outer header are compressed as a whole when its compression byte says so;
they are decompressed here with a bound computed from the plan (no bombs). A seeded object stores
only the first polynomial and the seed of the uniformly random second one (half the bytes).

What must hold, exactly (each failure is a 400 with a code, see `ApiError`):
- ciphertexts: the plan's top-level parms_id, NTT form, size 2, the plan's N and number of
  primes, the plan's input scale bit for bit, correction factor 1, a data count of 2*N*k (or
  N*k plus a seed), every word below its prime, no trailing bytes;
- keys: the key level's parms_id (all primes), each key a size-2 NTT-form ciphertext with scale
  1.0 and N*(k) words per polynomial, k-1 keys per decomposition, Galois indices below N.

`secret_key_refused` by structure (the rule and its scope are stated in docs/SERVICE.md): every
stored polynomial, every RNS component, is tested for being *short*, in coefficient form and
after an inverse NTT (see `ShortTest`). A ciphertext or key component is uniformly random mod
its prime; a secret key is ternary, an error small.
"""

from __future__ import annotations

import math
import secrets
import struct
import zlib
from dataclasses import dataclass, field

import numpy as np

from heinfer_server.errors import ApiError

SEAL_MAGIC = 0xA15E
HEADER = struct.Struct("<HBBBBHQ")
CT_META = struct.Struct("<32sBQQQdQ")  # parms_id, ntt, size, N, k, scale, correction
PT_META = struct.Struct("<32sQd")  # parms_id, coeff count, scale
U64 = struct.Struct("<Q")
PRNG_INFO_SIZE = 16 + 1 + 64
PRNG_TYPES = {1, 2}  # blake2xb, shake256
MAX_CT_SIZE = 16  # SEAL_CIPHERTEXT_SIZE_MAX


# -- primes and the inverse NTT at sampled positions -----------------------------------------
def _bitrev(n: int, bits: int) -> np.ndarray:
    i = np.arange(n, dtype=np.int64)
    r = np.zeros(n, dtype=np.int64)
    for b in range(bits):
        r |= ((i >> b) & 1) << (bits - 1 - b)
    return r


def minimal_root(q: int, m: int) -> int:
    """The smallest primitive m-th root of unity mod q (SEAL's choice for its NTT tables)."""
    for x in range(2, 1 << 16):
        g = pow(x, (q - 1) // m, q)
        if pow(g, m // 2, q) == q - 1:
            break
    else:  # pragma: no cover - every NTT-friendly prime has one
        raise ValueError(f"no primitive {m}-th root mod {q}")
    best, cur, g2 = g, g, g * g % q
    for _ in range(m // 2 - 1):
        cur = cur * g2 % q
        best = min(best, cur)
    return best


@dataclass
class ShortTest:
    """Is a polynomial (one RNS component, mod q) short?

    Small means within B = min(2^10, q / 2^10) of 0 modulo q (a ternary secret key is within
    1, an error term within ~20). Coefficient form: short if more than half of its N words are
    small. NTT form (SEAL stores a[i] = s(psi^(2 bitrev(i) + 1)), psi the smallest primitive
    2N-th root): short if at least half of K coefficients of its inverse NTT are small, at
    positions drawn per worker process from the OS's randomness and never shown. K per prime is
    the least of 8, 16, 24 for which a uniform component is flagged with probability below
    2^-60 (K = 8 from 28-bit primes up, 16 from 21 bits, else 24). Exact modular arithmetic
    by float64 matrix products over limbs (row limb + inverse-NTT limb + log2 N <= 53 bits:
    every partial sum is exact).
    A ternary or small-error polynomial is always flagged. Memory per worker and plan: a
    2N-word table per prime and one N x 24 index (the rows of the inverse NTT are gathered per
    call, not kept: 4 MB per prime at N = 32768)."""

    n: int
    primes: list[int]
    samples: int = 24  # the most any prime uses
    positions: np.ndarray = field(init=False)
    _tables: dict[int, np.ndarray] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        rnd = secrets.SystemRandom()
        self.positions = np.array(sorted(rnd.sample(range(self.n), self.samples)), np.int64)
        logn = self.n.bit_length() - 1
        e = 2 * _bitrev(self.n, logn) + 1
        # coefficient j of the inverse NTT = sum_i a[i] * T[(e_i * j) mod 2N], T[t] = N^-1 psi^-t
        self._index = ((e[:, None] * self.positions[None, :]) % (2 * self.n)).astype(np.int32)
        self._split_bits: dict[int, tuple[int, int]] = {}
        self._k: dict[int, int] = {q: self.samples_for(q) for q in self.primes}
        for q in self.primes:
            pinv = pow(minimal_root(q, 2 * self.n), -1, q)
            table = [pow(self.n, -1, q)] * (2 * self.n)
            for t in range(1, 2 * self.n):
                table[t] = table[t - 1] * pinv % q
            self._tables[q] = np.array(table, dtype=np.uint64)
            self._split_bits[q] = self._plan(q.bit_length(), 53 - logn)

    @staticmethod
    def _plan(bits: int, room: int) -> tuple[int, int]:
        """Limb widths (rows, inverse-NTT rows) with w_rows + w_u <= room, so each product
        summed over N stays below 2^53. Splitting the M x N rows costs about as much as four
        matrix products, so few row limbs are preferred (one for primes up to ~30 bits)."""
        best = None
        for ls in range(1, bits + 1):
            ws = -(-bits // ls)
            wu = room - ws
            if wu < 1:
                continue
            lu = -(-bits // wu)
            cost = 4 * ls + ls * lu
            if best is None or cost < best[0]:
                best = (cost, ws, wu)
        assert best is not None
        return best[1], best[2]

    @staticmethod
    def _split(a: np.ndarray, bits: int, width: int) -> list[np.ndarray]:
        """Limbs of `width` bits of the words of `a` (2-D), as float64 arrays. Done 32K words
        at a time so the integer temporaries stay in cache (2.5x faster at N = 8192)."""
        n_limbs = -(-bits // width)
        chunk = max(1, 32768 // a.shape[1])
        out = [np.empty(a.shape, np.float64) for _ in range(n_limbs)]
        mask = np.uint64((1 << width) - 1)
        for i in range(0, a.shape[0], chunk):
            block = a[i : i + chunk]
            for k, dst in enumerate(out):
                limb = block >> np.uint64(width * k) if k else block
                if k < n_limbs - 1:
                    limb = limb & mask
                # int64 -> float64 converts with SIMD, uint64 -> float64 does not
                np.copyto(dst[i : i + chunk], limb.view(np.int64), casting="unsafe")
        return out

    def _rows_split(self, rows: list[np.ndarray], q: int, width: int
                    ) -> tuple[list[np.ndarray], np.ndarray]:
        """Like `_split` for M rows given as separate 1-D arrays (views into the upload: no
        copy of the whole), and the coefficient-form test on the same cache-hot blocks:
        returns (limbs, whether each row is short in coefficient form)."""
        bits, n, m = q.bit_length(), self.n, len(rows)
        n_limbs = -(-bits // width)
        chunk = max(1, 32768 // n)
        out = [np.empty((m, n), np.float64) for _ in range(n_limbs)]
        raw = np.empty(m, bool)
        mask = np.uint64((1 << width) - 1)
        b, qb = np.uint64(self.bound(q)), np.uint64(q - self.bound(q))
        for i in range(0, m, chunk):
            block = np.stack(rows[i : i + chunk])
            raw[i : i + chunk] = ((block <= b) | (block >= qb)).sum(axis=1) * 2 > n
            for k, dst in enumerate(out):
                limb = block >> np.uint64(width * k) if k else block
                if k < n_limbs - 1:
                    limb = limb & mask
                np.copyto(dst[i : i + chunk], limb.view(np.int64), casting="unsafe")
        return out, raw

    @staticmethod
    def bound(q: int) -> int:
        return min(1 << 10, q >> 10)

    @classmethod
    def false_positive(cls, q: int, k: int) -> float:
        """Probability that a uniform component has at least k/2 of k sampled coefficients
        small: at most C(k, k/2) p^(k/2), p = (2B+1)/q."""
        return math.comb(k, k // 2) * ((2 * cls.bound(q) + 1) / q) ** (k // 2)

    @classmethod
    def samples_for(cls, q: int) -> int:
        return next((k for k in (8, 16) if cls.false_positive(q, k) < 2.0 ** -60), 24)

    def _small(self, v: np.ndarray, q: int) -> np.ndarray:
        b = np.uint64(self.bound(q))
        return (v <= b) | (v >= np.uint64(q) - b)

    def short_rows(self, rows: np.ndarray | list[np.ndarray], q: int) -> np.ndarray:
        """rows: M words-by-N (an array, or a list of 1-D arrays), each word < q. Returns a
        bool per row: short in either form."""
        bits = q.bit_length()
        ws, wu = self._split_bits[q]
        s_limbs, raw = self._rows_split(list(rows), q, ws)
        k = self._k[q]
        u_limbs = self._split(self._tables[q][self._index[:, :k]], bits, wu)  # N x k
        by_shift: dict[int, np.ndarray] = {}
        for a, sa in enumerate(s_limbs):
            for b, ub in enumerate(u_limbs):
                part = (sa @ ub).astype(np.uint64)  # exact: < 2^53
                shift = ws * a + wu * b
                by_shift[shift] = by_shift.get(shift, 0) + part  # a few terms: < 2^56
        total = np.zeros(len(raw) * k, dtype=object)
        for shift, part in by_shift.items():
            total = (total + (part % np.uint64(q)).astype(object).ravel()
                     * pow(2, shift, q)) % q
        coeffs = total.astype(np.uint64).reshape(len(raw), k)
        ntt = self._small(coeffs, q).sum(axis=1) * 2 >= k
        return raw | ntt


# -- what the plan expects --------------------------------------------------------------------
@dataclass
class Expect:
    """Everything the checks compare with, derived once per plan in a worker."""

    version: tuple[int, int]
    n: int
    key_primes: list[int]  # all primes, the key level's order
    key_parms_id: bytes
    input_parms_id: bytes  # the top data level
    input_primes: int
    input_scale: float
    short: ShortTest
    level_parms_ids: list[bytes]  # index = level: 0 (last data prime) .. top, then key level

    @classmethod
    def of_backend(cls, be, input_scale: float) -> Expect:
        """From the backend's `seal_layout()` (the server evaluates with TenSEAL)."""
        lay = be.seal_layout()
        levels = lay["level_parms_ids"]
        top = len(levels) - 2
        primes = list(lay["key_primes"])
        return cls(tuple(lay["version"]), lay["n"], primes, levels[-1], levels[top], top + 1,
                   float(input_scale), ShortTest(lay["n"], primes), levels)


# -- reading ----------------------------------------------------------------------------------
class _Bad(Exception):
    """A field that does not match; becomes an ApiError with `code`, or the caller's
    malformed_* code when None."""

    def __init__(self, detail: str, code: str | None = None):
        super().__init__(detail)
        self.code = code


class Reader:
    def __init__(self, data: bytes | memoryview):
        self.mv = memoryview(data)
        self.pos = 0

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or self.pos + n > len(self.mv):
            raise _Bad(f"truncated in {what}")
        out = self.mv[self.pos : self.pos + n]
        self.pos += n
        return out

    def u64(self, what: str) -> int:
        if self.pos + 8 > len(self.mv):
            raise _Bad(f"truncated in {what}")
        self.pos += 8
        return U64.unpack_from(self.mv, self.pos - 8)[0]

    def left(self) -> int:
        return len(self.mv) - self.pos


def _header(r: Reader, e: Expect, what: str) -> tuple[int, int]:
    """Check a SEAL header; returns (compression, declared total size)."""
    magic, hsize, major, minor, compr, reserved, size = HEADER.unpack(r.take(16, what))
    if magic != SEAL_MAGIC or hsize != 16:
        raise _Bad(f"{what}: no SEAL header")
    if (major, minor) != e.version:
        raise _Bad(f"{what}: written by SEAL {major}.{minor}, this server runs SEAL "
                   f"{e.version[0]}.{e.version[1]} (the spec's `backend`)", "params_mismatch")
    if compr not in (0, 1, 2) or reserved != 0:
        raise _Bad(f"{what}: SEAL header with compression {compr}, reserved {reserved}")
    return compr, size


def decompress(data: bytes | memoryview, e: Expect, limit: int, what: str) -> memoryview:
    """The members of a top-level SEAL object, decompressed to at most `limit` bytes (read in
    1 MiB chunks: nothing is allocated for the bound itself)."""
    r = Reader(data)
    compr, size = _header(r, e, what)
    if size != len(data):
        raise _Bad(f"{what}: the SEAL header announces {size:,} bytes, the section has "
                   f"{len(data):,}")
    body = r.take(r.left(), what)
    if compr == 0:
        return body
    parts: list[bytes] = []
    got = 0
    try:
        if compr == 1:
            d = zlib.decompressobj()
            parts.append(d.decompress(body, limit + 1))
            got = len(parts[0])
            if got <= limit and (not d.eof or d.unused_data):
                raise _Bad(f"{what}: zlib stream incomplete or followed by other bytes")
        else:
            import zstandard

            declared = zstandard.frame_content_size(body)  # SEAL's frames carry it
            if 0 <= declared <= limit:  # one allocation of exactly that size
                parts.append(zstandard.ZstdDecompressor().decompress(
                    body, max_output_size=declared))
                got = len(parts[0])
                if got != declared:
                    raise _Bad(f"{what}: zstd frame shorter than its declared size")
                return memoryview(parts[0])
            if declared > limit:
                raise _Bad(f"{what}: declares {declared:,} bytes decompressed, more than the "
                           f"{limit:,} the plan allows")
            reader = zstandard.ZstdDecompressor().stream_reader(body, read_across_frames=False)
            while got <= limit:
                chunk = reader.read(4 << 20)
                if not chunk:
                    break
                parts.append(chunk)
                got += len(chunk)
    except _Bad:
        raise
    except Exception as exc:  # zlib.error, zstandard.ZstdError: corrupt streams
        raise _Bad(f"{what}: compressed data is corrupt ({type(exc).__name__})") from None
    if got > limit:
        raise _Bad(f"{what}: decompresses to more than the {limit:,} bytes the plan allows")
    return memoryview(parts[0] if len(parts) == 1 else b"".join(parts))


def _dynarray(r: Reader, e: Expect, count_ok: tuple[int, ...], what: str) -> np.ndarray:
    compr, size = _header(r, e, f"{what} data")
    if compr != 0:
        raise _Bad(f"{what}: nested data must be uncompressed")
    count = r.u64(f"{what} data count")
    if count not in count_ok:
        raise _Bad(f"{what}: {count:,} data words, expected one of {sorted(count_ok)}")
    if size != 16 + 8 + 8 * count:
        raise _Bad(f"{what}: data header announces {size:,} bytes for {count:,} words")
    return np.frombuffer(r.take(8 * count, f"{what} data"), dtype="<u8")


def _prng_info(r: Reader, e: Expect, what: str) -> None:
    compr, size = _header(r, e, f"{what} seed")
    if compr != 0 or size != PRNG_INFO_SIZE:
        raise _Bad(f"{what}: malformed seed record")
    if r.take(1, f"{what} seed")[0] not in PRNG_TYPES:
        raise _Bad(f"{what}: unknown PRNG type")
    r.take(64, f"{what} seed")


def _ciphertext(r: Reader, e: Expect, *, parms_id: bytes, k: int, scale: float,
                what: str) -> np.ndarray:
    """Ciphertext members (after its header); returns stored words as (polys, k, N)."""
    pid, ntt, size, n, kk, sc, corr = CT_META.unpack(r.take(CT_META.size, what))
    if pid != parms_id:
        if pid in e.level_parms_ids:
            raise _Bad(f"{what}: at level {e.level_parms_ids.index(pid)}, expected a fresh one "
                       f"at level {e.level_parms_ids.index(parms_id)}")
        raise _Bad(f"{what}: parms_id is none of the plan's: made for other parameters",
                   "params_mismatch")
    if ntt != 1:
        raise _Bad(f"{what}: not in NTT form (flag {ntt})")
    if size != 2:
        raise _Bad(f"{what}: size {size}, expected 2")
    if n != e.n or kk != k:
        raise _Bad(f"{what}: ring degree {n} with {kk} primes, expected {e.n} with {k}",
                   "params_mismatch")
    if struct.pack("<d", sc) != struct.pack("<d", scale):
        raise _Bad(f"{what}: scale {sc!r} is not exactly {scale!r}")
    if corr != 1:
        raise _Bad(f"{what}: correction factor {corr}, expected 1")
    full = 2 * n * k
    words = _dynarray(r, e, (full, full // 2), what)
    if len(words) == full // 2:
        _prng_info(r, e, what)
    arr = words.reshape(-1, k, n)
    primes = np.array(e.key_primes[:k], dtype=np.uint64)  # data levels drop primes from the end
    if (arr.max(axis=2) >= primes[None, :]).any():
        raise _Bad(f"{what}: a coefficient is not reduced modulo its prime")
    return arr


def _expect_short_free(e: Expect, arrays: list[np.ndarray], k: int, what: str) -> None:
    primes = e.key_primes[:k]
    if not arrays:
        return
    polys = [p for a in arrays for p in a.reshape(-1, k, e.n)]
    for j, q in enumerate(primes):
        if e.short.short_rows([p[j] for p in polys], q).any():
            raise ApiError("secret_key_refused",
                           f"{what} holds a short polynomial (ternary or small coefficients, "
                           "as in a secret key or a zero polynomial) where only uniformly random "
                           "ones belong; a secret key never leaves the client")


# -- entry points -----------------------------------------------------------------------------
def ciphertext_limit(e: Expect, k: int) -> int:
    return CT_META.size + 24 + 16 * e.n * k + PRNG_INFO_SIZE


def check_ciphertext(data: bytes, e: Expect, index: int) -> None:
    """One predict input: exact fields, then the structural secret-key test. Raises ApiError."""
    check_ciphertexts([data], e, first=index)


def check_ciphertexts(items: list[bytes], e: Expect, first: int = 0) -> None:
    """Predict inputs: every field exact, then one short test over all their polynomials (one
    batch per prime: the test's cost is per call as much as per row)."""
    arrays = []
    for i, data in enumerate(items, start=first):
        what = f"ciphertext {i}"
        try:
            members = decompress(data, e, ciphertext_limit(e, e.input_primes), what)
            r = Reader(members)
            arrays.append(_ciphertext(r, e, parms_id=e.input_parms_id, k=e.input_primes,
                                      scale=e.input_scale, what=what))
            if r.left():
                raise _Bad(f"{what}: {r.left()} trailing bytes")
        except _Bad as bad:
            _maybe_secret_key(data, e, what)
            raise ApiError(bad.code or "malformed_ciphertext", str(bad)) from None
    what = f"ciphertext {first}" if len(items) == 1 else "a ciphertext"
    _expect_short_free(e, arrays, e.input_primes, what)


def _public_key_members(r: Reader, e: Expect, what: str) -> np.ndarray:
    k = len(e.key_primes)
    return _ciphertext(r, e, parms_id=e.key_parms_id, k=k, scale=1.0, what=what)


def check_key_section(data: bytes, e: Expect, kind: str, limit: int) -> bytes:
    """One EVAL_KEYS section (RELIN_KEYS, GALOIS_KEYS or PUBLIC_KEY); raises ApiError.
    Returns the same object uncompressed, for SEAL to load without decompressing it again."""
    what = f"the {kind} section"
    k = len(e.key_primes)
    arrays: list[np.ndarray] = []
    try:
        members = decompress(data, e, limit, what)
        r = Reader(members)
        if kind == "PUBLIC_KEY":
            arrays.append(_public_key_members(r, e, what))
        else:
            if bytes(r.take(32, what)) != e.key_parms_id:
                raise _Bad(f"{what}: parms_id is not the plan's key level: made for other "
                           "parameters", "params_mismatch")
            dim1 = r.u64(what)
            if not 1 <= dim1 <= e.n:
                raise _Bad(f"{what}: {dim1} key slots")
            for i in range(dim1):
                dim2 = r.u64(what)
                if dim2 not in (0, k - 1):
                    raise _Bad(f"{what}: key {i} has {dim2} parts, expected {k - 1}")
                for j in range(dim2):
                    part = f"{what} key {i} part {j}"
                    compr, size = _header(r, e, part)
                    start = r.pos - 16
                    if compr != 0:
                        raise _Bad(f"{part}: nested keys must be uncompressed")
                    arrays.append(_public_key_members(r, e, part))
                    if r.pos - start != size:
                        raise _Bad(f"{part}: header announces {size:,} bytes, holds "
                                   f"{r.pos - start:,}")
        if r.left():
            raise _Bad(f"{what}: {r.left()} trailing bytes")
    except _Bad as bad:
        _maybe_secret_key(data, e, what)
        raise ApiError(bad.code or "malformed_keys", str(bad)) from None
    _expect_short_free(e, arrays, k, what)
    if data[5] == 0:  # the header's compression byte: uncompressed already
        return bytes(data)
    return HEADER.pack(SEAL_MAGIC, 16, *e.version, 0, 0, 16 + len(members)) + members


def _maybe_secret_key(data: bytes, e: Expect, what: str) -> None:
    """A section that is not what it claims may be a SecretKey (a Plaintext over all primes):
    say so when its data is short."""
    k = len(e.key_primes)
    try:
        members = decompress(data, e, PT_META.size + 24 + 8 * e.n * k, what)
        r = Reader(members)
        pid, count, _scale = PT_META.unpack(r.take(PT_META.size, what))
        words = _dynarray(r, e, (count,), what)
        if count != e.n * k or r.left() or int(words.max()) >= max(e.key_primes):
            return
    except _Bad:
        return
    _expect_short_free(e, [words], k, what)


def key_members_limit(e: Expect, kind: str, n_steps: int) -> int:
    """Decompressed bound of a key section from the plan (no bombs): one public key, or key
    switching keys for the plan's steps plus 64 more (clients may key extra steps; the upload
    size limit bounds them too)."""
    k = len(e.key_primes)
    key = (k - 1) * (16 + ciphertext_limit(e, k))
    if kind == "PUBLIC_KEY":
        return ciphertext_limit(e, k)
    return 40 + 8 * e.n + (n_steps + 64) * key
