"""HE work off the event loop: a process pool, one request per worker at a time.

Every TenSEAL/SEAL call holds the GIL for its whole duration, so threads would serialize and
stall the event loop; processes run in parallel. The API process only streams bodies, checks
framing and talks to SQLite; everything that touches SEAL runs here, in `EvalPool`'s workers.

Jobs carry file paths for keys and plans (large, on disk already). A ciphertext body travels
as bytes when small, and as a file path when large (`PredictJob.body_path`, written by the API
to /dev/shm when there is one, else a temporary file): big bodies skip the pool's pipe.

Each worker keeps two bounded caches: compiled plans by plan hash (LRU by count: kernels with
their plaintexts encoded once) and session backends by session id (keys loaded from disk once),
bounded in bytes overall and per tenant (`keycache.KeyCache`). A session backend comes from
`Backend.with_eval_keys`: it shares the plan's backend context, so plaintexts encoded for the
plan and keys loaded for the session live under the same context.
Every key operation (loading, the secret-key probe, coverage of the rotation steps) goes through
the backend: this module never imports a SEAL binding.

The API side of the pool (admission, per-tenant fair queue, crash isolation) is `pool.py`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import signal
import threading
import time
import traceback
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from heinfer_server import seal_format
from heinfer_server.errors import ApiError
from heinfer_server.keycache import KeyCache
from heinfer_server.keycheck import seal_header_ok, tenseal_context_secret

log = logging.getLogger("heinfer.server")

KEY_FILES = {"RELIN_KEYS": "relin.seal", "GALOIS_KEYS": "galois.seal",
             "PUBLIC_KEY": "public.seal"}

# -- worker side ------------------------------------------------------------------------------
_PLANS: OrderedDict[str, Any] = OrderedDict()
_EXPECT: OrderedDict[str, seal_format.Expect] = OrderedDict()
_SESSIONS = KeyCache(1 << 30, 512 << 20)
_LIMITS = {"models": 4}


def _init_worker(parent_pid: int, max_models: int, key_bytes: int, tenant_bytes: int) -> None:
    """Runs once in each worker: cache sizes, and exit when the API process is gone (after a
    kill -9 nothing else would tell a worker blocked on its pipe)."""
    global _SESSIONS
    _LIMITS.update(models=max_models)
    _SESSIONS = KeyCache(key_bytes, tenant_bytes)
    # Ctrl-C in a terminal signals the whole group: the API process stops the pool in order
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent_pid:
                os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
    import heinfer.plan  # noqa: F401  (import tenseal and numpy now, not in the first request)


def _lru_put(cache: OrderedDict, key: str, value: Any, limit: int) -> None:
    cache[key] = value
    cache.move_to_end(key)
    while len(cache) > limit:
        cache.popitem(last=False)


def _compiled(plan_path: str, plan_hash: str):
    from heinfer.backends import make_backend
    from heinfer.plan import CompiledPlan, Plan

    hit = _PLANS.get(plan_hash)
    if hit is not None:
        _PLANS.move_to_end(plan_hash)
        return hit
    try:
        plan = Plan.load(plan_path)
    except Exception as e:  # the server's own file: never a client error, never its path
        log.error("stored plan unreadable", extra={"path": plan_path, "error": repr(e)})
        raise ApiError("plan_files_missing", "the model's plan files are missing or unreadable "
                       "on the server; an operator must restore them or re-add the model") from None
    if plan.hash() != plan_hash:
        raise ApiError("plan_files_missing", f"the model's plan file does not match its hash "
                       f"{plan_hash}; an operator must restore it or re-add the model")
    compiled = CompiledPlan(plan, make_backend(plan.params, plan.backend_name))
    _lru_put(_PLANS, plan_hash, compiled, _LIMITS["models"])
    return compiled


def _expect(compiled) -> seal_format.Expect:
    """What uploaded SEAL objects must match for this plan (see seal_format), cached."""
    h = compiled.spec.plan_hash
    hit = _EXPECT.get(h)
    if hit is None:
        hit = seal_format.Expect.of_backend(compiled.backend, compiled.plan.params.scale)
    _lru_put(_EXPECT, h, hit, _LIMITS["models"])
    return hit


def _stored_keys(d: Path, steps: list[int]):
    from heinfer.backends.base import EvalKeyBytes

    galois = d / KEY_FILES["GALOIS_KEYS"]
    return EvalKeyBytes((d / KEY_FILES["RELIN_KEYS"]).read_bytes(),
                        galois.read_bytes() if galois.exists() else b"", list(steps))


def _key_cost(keys) -> int:
    """Bytes a loaded key set holds, estimated as twice its stored size (clients send seeded
    keys: SEAL stores half of each key-switching polynomial pair and expands it on load)."""
    return 2 * (len(keys.relin_keys) + len(keys.galois_keys))


def _session_backend(session_id: str, key_dir: str, compiled, tenant: str):
    """The session's backend and whether it came from the cache."""
    from heinfer.errors import HeinferError

    cache_key = f"{session_id}:{compiled.spec.plan_hash}"
    hit = _SESSIONS.get(cache_key)
    if hit is not None and _holds(hit, compiled, cache_key):
        return hit, True
    d = Path(key_dir)
    if not (d / KEY_FILES["RELIN_KEYS"]).exists():  # deleted or expired since the API checked
        raise ApiError("unknown_session", f"session {session_id} was closed meanwhile")
    public = d / KEY_FILES["PUBLIC_KEY"]  # outputs are re-randomized with it when present
    try:
        keys = _stored_keys(d, compiled.spec.rotation_steps)
        _LOADED.pop(compiled.spec.plan_hash, None)  # a shared backend drops what it held
        be = compiled.backend.with_eval_keys(keys, public.read_bytes() if public.exists()
                                             else None)
    except (HeinferError, OSError) as e:
        raise ApiError("internal", f"stored keys of session {session_id} do not load: {e}") from e
    _SESSIONS.put(cache_key, tenant, _key_cost(keys), be)
    _LOADED[compiled.spec.plan_hash] = cache_key
    return be, False


# A backend that holds one key set at a time (Pyfhel: `with_eval_keys` loads into the plan's
# own backend, `shares_keys`) serves the session whose keys it loaded last; any other session's
# keys are loaded again from its key directory first. A worker runs one job at a time.
_LOADED: dict[str, str] = {}  # plan hash -> "session:plan hash" whose keys it holds


def _holds(be, compiled, cache_key: str) -> bool:
    return (not getattr(be, "shares_keys", False)
            or _LOADED.get(compiled.spec.plan_hash) == cache_key)


@dataclass(frozen=True)
class PlanInfo:
    name: str
    plan_hash: str
    spec_json: str
    n_inputs: int
    insecure: bool
    preprocessing_json: str = "null"


def inspect_plan(json_path: str, allow_insecure: bool, force: bool = False) -> PlanInfo:
    """Load a plan file (strictly: plan_check; then its version and hash), require a passed
    check record (heinfer.check; unless `force`) and derive its public spec."""
    from heinfer.check import record_of
    from heinfer_server.plan_check import load_checked

    plan = load_checked(json_path)
    try:
        rec = record_of(plan)
    except ValueError as e:  # pydantic: a record of the wrong shape
        raise ApiError("unchecked_plan", f"plan {plan.name}: unreadable check record: {e}") from e
    if not force and (rec is None or not rec.passed):
        what = ("carries no check record" if rec is None
                else f"failed its check ({'; '.join(rec.reasons)})")
        raise ApiError("unchecked_plan",
                       f"plan {plan.name} {what}: a plan is served only once it has been run "
                       "encrypted and compared with plaintext. Compile it with `heinfer "
                       "compile` (which checks every plan) or record a check with `heinfer "
                       "verify PLAN --inputs FILE.npz --record`; an admin may force it (heinfer "
                       "models add --force, HEINFER_ALLOW_UNCHECKED_PLANS for startup plans)")
    if plan.params.security_bits() < 128 and not allow_insecure:
        raise ApiError("insecure_params",
                       f"plan {plan.name} uses {plan.params.describe()}; this server refuses "
                       "parameters below 128-bit security (HEINFER_ALLOW_INSECURE_PARAMS=true "
                       "for tests only)")
    spec = plan.spec(_serving_backend(plan))
    # public input preprocessing recorded by training (e.g. normalization mean/std): clients
    # need it to turn raw pixels into the model's input; nothing else of the metadata is shown
    pre = plan.metadata.get("normalization")
    return PlanInfo(plan.name, spec.plan_hash, spec.model_dump_json(), plan.input_layout.n_ct,
                    plan.params.security_bits() < 128,
                    json.dumps({"normalization": pre} if pre else None))


def _serving_backend(plan):
    """The backend the plan names (metadata.backend), or invalid_plan when this server
    cannot run it."""
    from heinfer.backends import PYFHEL_MISSING, backend_available, make_backend
    from heinfer.errors import HeinferError

    try:
        name = plan.backend_name
    except HeinferError as e:
        raise ApiError("invalid_plan", str(e)) from None
    if not backend_available(name):
        raise ApiError("invalid_plan", f"plan {plan.name} is compiled for the {name} backend, "
                       f"which this server does not have: {PYFHEL_MISSING}")
    return make_backend(plan.params, name)


@dataclass(frozen=True)
class KeyJob:
    upload_path: str
    sections: tuple[tuple[str, int, int], ...]  # (type name, offset, length), framing checked
    dest_dir: str
    plan_path: str
    plan_hash: str
    session_id: str
    owner: str = ""  # the tenant whose share of the key cache holds these keys


def validate_keys(job: KeyJob) -> dict[str, int]:
    """Split an EVAL_KEYS upload into one file per SEAL object and check each: framing and
    SEAL version here (see keycheck), secret-key probe, loading and key coverage in the backend
    (`Backend.with_eval_keys`). Returns bytes per section. On success the keys stay loaded in
    this worker's cache."""
    from heinfer.errors import (
        MissingKeyError,
        ParamsMismatchError,
        SecretKeyError,
        SerializationError,
    )

    compiled = _compiled(job.plan_path, job.plan_hash)
    be = compiled.backend
    params = compiled.plan.params
    dest = Path(job.dest_dir)
    dest.mkdir(parents=True, exist_ok=False)
    expect = _expect(compiled)
    n_steps = len(compiled.spec.rotation_steps)
    sizes: dict[str, int] = {}
    plain: dict[str, bytes] = {}  # each section uncompressed: SEAL need not decompress again
    with open(job.upload_path, "rb") as f:
        for name, offset, length in job.sections:
            f.seek(offset)
            head = f.read(16)
            if not seal_header_ok(head, length):
                secret = tenseal_context_secret(f, offset, length)
                if secret:
                    raise ApiError("secret_key_refused",
                                   f"the {name} section is a TenSEAL context holding a secret "
                                   "key; send only public evaluation keys (heinfer.wire "
                                   "EVAL_KEYS) and keep the secret key on the client")
                what = ("a TenSEAL context (contexts are not accepted)" if secret is False
                        else "not a SEAL object of exactly the section's length")
                raise ApiError("malformed_keys", f"the {name} section is {what}")
            if (head[3], head[4]) != tuple(be.seal_version):  # SEAL loads only its own x.y
                raise ApiError("params_mismatch",
                               f"the {name} section was written by SEAL {head[3]}.{head[4]}; "
                               f"this server runs {be.wire_format} (the spec's `backend`): "
                               "make the keys with that backend")
            f.seek(offset)
            data = f.read(length)
            if len(data) != length:
                raise ApiError("malformed_body", "upload shorter than its framing")
            # every field exact and no short polynomial, before SEAL parses a byte
            plain[name] = seal_format.check_key_section(
                data, expect, name, seal_format.key_members_limit(expect, name, n_steps))
            (dest / KEY_FILES[name]).write_bytes(data)
            del data
            sizes[name] = length
    if "RELIN_KEYS" not in sizes:
        raise ApiError("missing_keys", "the upload holds no RELIN_KEYS section")
    steps = compiled.spec.rotation_steps
    if "PUBLIC_KEY" not in sizes and compiled.spec.output.flood is not None:
        raise ApiError("missing_keys",
                       f"model {compiled.plan.name} sanitizes its outputs (re-randomized with "
                       "the client's public key, then flooded): send a PUBLIC_KEY section with "
                       "the evaluation keys")
    try:
        from heinfer.backends.base import EvalKeyBytes

        keys = _stored_keys(dest, steps)  # as stored (compressed): the cache's size estimate
        _LOADED.pop(job.plan_hash, None)  # a shared backend drops what it held
        session_be = be.with_eval_keys(
            EvalKeyBytes(plain["RELIN_KEYS"], plain.get("GALOIS_KEYS", b""), list(steps)),
            plain.get("PUBLIC_KEY"))
    except SecretKeyError as e:
        raise ApiError("secret_key_refused", str(e)) from e
    except (ParamsMismatchError, SerializationError) as e:
        raise ApiError("params_mismatch", f"{e} (the model's parameters: "
                       f"{params.describe()})") from e
    except MissingKeyError as e:
        raise ApiError("missing_keys", f"{e}; the model's spec lists the steps to make keys "
                       f"for: {steps}") from e
    except (ApiError, OSError):
        raise
    except Exception as e:  # whatever else a loader raises is the upload's, never a 500
        raise ApiError("params_mismatch", f"the keys do not load under the model's parameters "
                       f"({params.describe()}): {type(e).__name__}") from e
    _SESSIONS.put(f"{job.session_id}:{job.plan_hash}", job.owner, _key_cost(keys), session_be)
    _LOADED[job.plan_hash] = f"{job.session_id}:{job.plan_hash}"
    return sizes


@dataclass(frozen=True)
class PredictJob:
    model: str
    plan_path: str
    plan_hash: str
    session_id: str
    key_dir: str
    body: bytes | bytearray
    n_inputs: int
    max_item_bytes: int
    body_path: str | None = None  # large bodies travel as a file in RAM, not through the pipe
    owner: str = ""


def predict(job: PredictJob) -> tuple[bytes, float, bool]:
    """Evaluate the plan on the body's ciphertexts with the session's keys.
    Returns (output body in heinfer wire framing, seconds of HE work, key cache hit)."""
    from heinfer import wire
    from heinfer.sanitize import Sanitizer

    t0 = time.perf_counter()
    compiled = _compiled(job.plan_path, job.plan_hash)
    be, cached = _session_backend(job.session_id, job.key_dir, compiled, job.owner)
    body = Path(job.body_path).read_bytes() if job.body_path else job.body
    items = wire.decode_ciphertexts(body, expected_count=job.n_inputs,
                                    max_item_bytes=job.max_item_bytes)
    params = compiled.plan.params
    for i, data in enumerate(items):
        if not seal_header_ok(data[:16], len(data)):
            raise ApiError("malformed_ciphertext",
                           f"item {i} is not a SEAL object of exactly its section's length")
    # every field exact and no short polynomial, before SEAL parses a byte
    seal_format.check_ciphertexts(items, _expect(compiled))
    cts = []
    for i, data in enumerate(items):
        try:
            ct = be.ciphertext_from_bytes(data)
        except Exception as e:  # any loader failure is the input's, never a 500
            raise ApiError("params_mismatch",
                           f"ciphertext {i} does not load under the model's parameters "
                           f"({params.describe()}, {be.wire_format}): {e}") from e
        if ct.size() != 2 or be.level(ct) != params.top_level or (
                be.scale_of(ct) != params.scale):  # exact: SEAL's kernels need the same bits
            raise ApiError("malformed_ciphertext",
                           f"ciphertext {i} must be fresh: size 2 at level {params.top_level} "
                           f"and scale 2^{params.scale_bits} (got size {ct.size()}, level "
                           f"{be.level(ct)}, scale 2^{math.log2(be.scale_of(ct)):.2f})")
        cts.append(ct)
    out = compiled.run(cts, backend=be)
    flood = compiled.plan.flood_spec()
    if flood is not None and getattr(be, "public_key", None) is None:
        raise ApiError("missing_keys", f"model {job.model} sanitizes its outputs: the session "
                       "has no public key (create a session with one)")
    if getattr(be, "public_key", None) is not None:
        # re-randomize whenever the client sent its public key; flood when the plan says so
        sanitize = Sanitizer(be, flood)
        out = [sanitize(c) for c in out]
    body = wire.encode_ciphertexts([be.ciphertext_to_bytes(c) for c in out])
    return body, time.perf_counter() - t0, cached


def _portable(exc: BaseException) -> tuple[BaseException, str | None]:
    """The exception as it can cross the pipe, with the worker-side traceback of unexpected
    ones (a client error needs none)."""
    tb = None if isinstance(exc, ApiError) else "".join(traceback.format_exception(exc))
    try:
        pickle.dumps(exc)
    except Exception:
        exc = RuntimeError(f"{type(exc).__name__}: {exc}")
    return exc, tb


def worker_main(conn, init_args: tuple) -> None:
    """A pool worker's whole life (pool.py): say ready, then one job at a time. "start" is sent
    before the job runs, so the API knows whether a job it lost with a dead worker had begun."""
    _init_worker(*init_args)
    conn.send(("ready", os.getpid()))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        fn, args = msg
        conn.send(("start", None))
        try:
            reply: tuple = ("ok", fn(*args))
        except BaseException as e:  # noqa: BLE001  (every failure goes back to its request)
            reply = ("err", _portable(e))
        try:
            conn.send(reply)
        except Exception as e:  # a result that does not pickle: a bug, reported as one
            conn.send(("err", _portable(RuntimeError(f"result not sendable: {e!r}"))))
