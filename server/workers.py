"""HE work off the event loop: a process pool, one request per worker at a time.

Every TenSEAL/SEAL call holds the GIL for its whole duration, so threads would serialize and
stall the event loop; processes run in parallel. The API process only streams bodies, checks
framing and talks to SQLite; everything that touches SEAL runs here, in `EvalPool`'s workers.

Jobs carry file paths for keys and plans (large, on disk already). A ciphertext body travels
as bytes when small, and as a file path when large (`PredictJob.body_path`, written by the API
to /dev/shm when there is one, else a temporary file): big bodies skip the pool's pipe.

Each worker keeps two bounded LRU caches: compiled plans by plan hash (kernels with their
plaintexts encoded once) and session backends by session id (keys loaded from disk once). A
session backend comes from `Backend.with_eval_keys`: it shares the plan's backend context, so
plaintexts encoded for the plan and keys loaded for the session live under the same context.
Every key operation (loading, the secret-key probe, coverage of the rotation steps) goes through
the backend: this module never imports a SEAL binding.

Limits: the pool admits `workers + max_queue` jobs; one more answers 503 with Retry-After. A job
over its time limit answers 504; a job still queued is cancelled, a running one cannot be
interrupted and keeps its worker (and its queue slot) until it finishes. A crashed worker breaks
the pool: it is rebuilt and the request answers 503 (the SDK retries).
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import math
import multiprocessing
import os
import signal
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from heinfer_server import seal_format
from heinfer_server.errors import ApiError
from heinfer_server.keycheck import seal_header_ok, tenseal_context_secret

log = logging.getLogger("heinfer.server")

KEY_FILES = {"RELIN_KEYS": "relin.seal", "GALOIS_KEYS": "galois.seal",
             "PUBLIC_KEY": "public.seal"}

# -- worker side ------------------------------------------------------------------------------
_PLANS: OrderedDict[str, Any] = OrderedDict()
_EXPECT: OrderedDict[str, seal_format.Expect] = OrderedDict()
_SESSIONS: OrderedDict[str, Any] = OrderedDict()
_LIMITS = {"models": 4, "sessions": 4}


def _init_worker(parent_pid: int, max_models: int, max_sessions: int) -> None:
    """Runs once in each worker: cache sizes, and exit when the API process is gone (after a
    kill -9 nothing else would tell a worker blocked on its call queue)."""
    _LIMITS.update(models=max_models, sessions=max_sessions)
    # Ctrl-C in a terminal signals the whole group: the API process stops the pool in order
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent_pid:
                os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
    import heinfer.plan  # noqa: F401  (import tenseal and numpy now, not in the first request)


def ping() -> int:
    return os.getpid()


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
    compiled = CompiledPlan(plan, make_backend(plan.params))
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


def _session_backend(session_id: str, key_dir: str, compiled):
    from heinfer.errors import HeinferError

    cache_key = f"{session_id}:{compiled.spec.plan_hash}"
    hit = _SESSIONS.get(cache_key)
    if hit is not None:
        _SESSIONS.move_to_end(cache_key)
        return hit
    d = Path(key_dir)
    if not (d / KEY_FILES["RELIN_KEYS"]).exists():  # deleted or expired since the API checked
        raise ApiError("unknown_session", f"session {session_id} was closed meanwhile")
    try:
        be = compiled.backend.with_eval_keys(_stored_keys(d, compiled.spec.rotation_steps))
    except (HeinferError, OSError) as e:
        raise ApiError("internal", f"stored keys of session {session_id} do not load: {e}") from e
    _lru_put(_SESSIONS, cache_key, be, _LIMITS["sessions"])
    return be


@dataclass(frozen=True)
class PlanInfo:
    name: str
    plan_hash: str
    spec_json: str
    n_inputs: int
    insecure: bool
    preprocessing_json: str = "null"


def inspect_plan(json_path: str, allow_insecure: bool) -> PlanInfo:
    """Load a plan file (strictly: plan_check; then its version and hash) and derive its
    public spec."""
    from heinfer_server.plan_check import load_checked

    plan = load_checked(json_path)
    if plan.params.security_bits() < 128 and not allow_insecure:
        raise ApiError("insecure_params",
                       f"plan {plan.name} uses {plan.params.describe()}; this server refuses "
                       "parameters below 128-bit security (HEINFER_ALLOW_INSECURE_PARAMS=true "
                       "for tests only)")
    spec = plan.spec()
    # public input preprocessing recorded by training (e.g. normalization mean/std): clients
    # need it to turn raw pixels into the model's input; nothing else of the metadata is shown
    pre = plan.metadata.get("normalization")
    return PlanInfo(plan.name, spec.plan_hash, spec.model_dump_json(), plan.input_layout.n_ct,
                    plan.params.security_bits() < 128,
                    json.dumps({"normalization": pre} if pre else None))


@dataclass(frozen=True)
class KeyJob:
    upload_path: str
    sections: tuple[tuple[str, int, int], ...]  # (type name, offset, length), framing checked
    dest_dir: str
    plan_path: str
    plan_hash: str
    session_id: str


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
            seal_format.check_key_section(data, expect, name,
                                          seal_format.key_members_limit(expect, name, n_steps))
            (dest / KEY_FILES[name]).write_bytes(data)
            del data
            sizes[name] = length
    if "RELIN_KEYS" not in sizes:
        raise ApiError("missing_keys", "the upload holds no RELIN_KEYS section")
    steps = compiled.spec.rotation_steps
    public = dest / KEY_FILES["PUBLIC_KEY"]
    try:
        session_be = be.with_eval_keys(_stored_keys(dest, steps),
                                       public.read_bytes() if public.exists() else None)
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
    _lru_put(_SESSIONS, f"{job.session_id}:{job.plan_hash}", session_be, _LIMITS["sessions"])
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


def predict(job: PredictJob) -> tuple[bytes, float]:
    """Evaluate the plan on the body's ciphertexts with the session's keys.
    Returns (output body in heinfer wire framing, seconds of HE work)."""
    from heinfer import wire

    t0 = time.perf_counter()
    compiled = _compiled(job.plan_path, job.plan_hash)
    be = _session_backend(job.session_id, job.key_dir, compiled)
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
    body = wire.encode_ciphertexts([be.ciphertext_to_bytes(c) for c in out])
    return body, time.perf_counter() - t0


def forget_session(session_id: str) -> None:
    for k in [k for k in _SESSIONS if k.startswith(session_id + ":")]:
        del _SESSIONS[k]


# -- API side ---------------------------------------------------------------------------------
class EvalPool:
    """Bounded admission in front of a ProcessPoolExecutor (see the module docstring)."""

    def __init__(self, *, workers: int, max_queue: int, start_method: str, cache_models: int,
                 cache_sessions: int, metrics=None):
        self.workers = workers
        self.capacity = workers + max_queue
        self._start_method = start_method
        self._init_args = (os.getpid(), cache_models, cache_sessions)
        self._metrics = metrics
        self._pending = 0
        self._eval_avg = 1.0  # seconds, moving average, for Retry-After
        self._executor = self._new_executor()
        self.ready = False

    def _new_executor(self) -> ProcessPoolExecutor:
        # one BLAS thread per worker (spawned workers read this at import): the workers take a
        # core each already, and OpenBLAS threads competing for them made the key check's
        # matrix products 10x slower on a busy machine (docs/SERVICE.md, "Secret keys")
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
        return ProcessPoolExecutor(max_workers=self.workers,
                                   mp_context=multiprocessing.get_context(self._start_method),
                                   initializer=_init_worker, initargs=self._init_args)

    @property
    def pending(self) -> int:
        return self._pending

    async def warm_up(self) -> None:
        """Start every worker now (imports take a second each), then report ready."""
        seen: set[int] = set()
        for _ in range(100):  # until each worker has answered (its initializer then ran)
            futs = [self._executor.submit(ping) for _ in range(self.workers * 2)]
            seen |= set(await asyncio.gather(*(asyncio.wrap_future(f) for f in futs)))
            if len(seen) >= self.workers:
                break
            await asyncio.sleep(0.05)
        self.ready = True
        if self._metrics:
            self._metrics.workers.set(self.workers)

    def retry_after(self) -> int:
        return max(1, math.ceil(self._eval_avg * self._pending / self.workers))

    def _release(self, _: Future) -> None:
        self._pending -= 1
        if self._metrics:
            self._metrics.queue_depth.set(self._pending)

    async def run(self, fn, *args, timeout: float, queue: bool = True) -> Any:
        """Run fn(*args) in a worker. `queue=False` jobs (admin, session checks) still count
        but are never refused: they are rare and must not fail because predicts are busy."""
        if queue and self._pending >= self.capacity:
            if self._metrics:
                self._metrics.queue_rejections.inc()
            raise ApiError("overloaded", f"all {self.workers} workers busy and "
                           f"{self.capacity - self.workers} request(s) waiting; retry later",
                           headers={"Retry-After": str(self.retry_after())})
        loop = asyncio.get_running_loop()
        executor = self._executor
        try:
            fut = executor.submit(fn, *args)
        except (BrokenProcessPool, RuntimeError):
            self._rebuild(executor)
            raise ApiError("worker_crashed", "the worker pool was restarting; retry",
                           headers={"Retry-After": "1"}) from None
        self._pending += 1
        if self._metrics:
            self._metrics.queue_depth.set(self._pending)
        def done(f: Future) -> None:
            try:
                loop.call_soon_threadsafe(self._release, f)
            except RuntimeError:  # the loop closed (shutdown) while the job ran
                pass

        fut.add_done_callback(done)
        t0 = time.perf_counter()
        try:
            result = await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(fut)), timeout)
        except TimeoutError:
            fut.cancel()  # succeeds only while still queued
            raise ApiError("timeout", f"evaluation took longer than the {timeout:g} s "
                           "limit") from None
        except BrokenProcessPool:
            self._rebuild(executor)
            raise ApiError("worker_crashed", "a worker process died during this request; "
                           "retry", headers={"Retry-After": "1"}) from None
        self._eval_avg = 0.8 * self._eval_avg + 0.2 * (time.perf_counter() - t0)
        return result

    def _rebuild(self, broken: ProcessPoolExecutor) -> None:
        """Replace a broken executor once, however many requests saw it break."""
        if self._executor is broken:
            log.error("worker pool broken; starting a new one")
            self._executor = self._new_executor()
            broken.shutdown(wait=False, cancel_futures=True)

    def shutdown(self, grace: float = 5.0) -> None:
        """Stop and reap the workers, then free the pool's queues now. uvicorn re-raises the
        signal that stopped it, so the process dies without running exit handlers: queues
        still alive then leak their semaphores (`resource_tracker: ... leaked semaphore
        objects`)."""
        ex = self._executor
        procs = list((getattr(ex, "_processes", None) or {}).values())
        manager = getattr(ex, "_executor_manager_thread", None)
        ex.shutdown(wait=False, cancel_futures=True)
        deadline = time.monotonic() + grace
        for p in procs:  # a running job may finish within the grace period
            p.join(max(0.0, deadline - time.monotonic()))
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(2.0)
        if manager is not None:
            manager.join(2.0)
        del procs, manager
        multiprocessing.active_children()  # forget the reaped workers (they hold the queues)
        gc.collect()  # the queues' finalizers unlink their semaphores
