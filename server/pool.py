"""The API side of the HE worker pool: admission, a per-tenant fair queue, crash isolation.

Each worker is one process (`workers.worker_main`) with its own pipe, fed one job at a time by a
thread of the API process (pipes never block the event loop). All pool state lives on the event
loop; the threads only post what they saw. Why not a ProcessPoolExecutor: one dead worker breaks
the whole executor and fails every request in flight, whoever sent it (issue 12).

* Admission: `workers + max_queue` jobs in all (one more answers 503 `overloaded` with
  Retry-After) and at most `workers + ceil(max_queue / 2)` per tenant (API key), so one key can
  never fill the queue; jobs that are not queued (admin, start-up) are never refused.
* Fair queue: one FIFO per tenant; a free worker takes the next job of the waiting tenant served
  least recently, so a tenant's next job waits for at most one job of each other waiting tenant
  (plus the jobs already running), never behind another tenant's backlog. Among idle workers,
  the one that last ran the same session is preferred (its keys are likely cached).
* Crash isolation: a worker acknowledges each job before running it. If it dies after that, only
  that job fails: 500 `worker_crashed` (final: retrying a job that killed a worker would kill
  another). A job sent to a worker that died before acknowledging it is put back at the head of
  its tenant's queue and runs on a fresh worker; the client never notices. Other workers and
  their jobs are untouched; a dead worker (busy or idle) is replaced at once and counted in
  `heinfer_worker_crashes_total{during}`. A key whose requests killed `max_crashes` workers
  within `crash_window_s` is refused (429 `too_many_crashes`, Retry-After) until the oldest
  crash leaves the window: respawning workers costs everyone CPU.
* Time limit: a queued job past its limit is dropped, a running one has its worker killed and
  replaced (504 `timeout` either way), so the slot is free again at once.
"""

from __future__ import annotations

import asyncio
import logging
import math
import multiprocessing
import os
import queue
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

from heinfer_server.errors import ApiError
from heinfer_server.workers import worker_main

log = logging.getLogger("heinfer.server")
MAX_ATTEMPTS = 3  # a job whose workers keep dying before it starts fails after this many


class RemoteTraceback(Exception):
    """Carries a worker-side traceback as the cause of the exception it raised."""

    def __str__(self) -> str:
        return str(self.args[0])


class _Job:
    def __init__(self, fn: Callable, args: tuple, tenant: str, affinity: str | None,
                 counted: bool, future: asyncio.Future):
        self.fn, self.args, self.tenant, self.affinity = fn, args, tenant, affinity
        self.counted, self.future = counted, future
        self.state = "queued"  # -> assigned -> running -> done
        self.attempts = 0
        self.abandoned = False
        self.started_at = 0.0


class _Worker:
    """One process, its pipe, and the API-side thread that talks to it."""

    def __init__(self, pool: EvalPool, index: int):
        # one BLAS thread per worker (spawned workers read this at import): the workers take a
        # core each already, and OpenBLAS threads competing for them made the key check's
        # matrix products 10x slower on a busy machine (docs/SERVICE.md, "Secret keys")
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
        ctx = multiprocessing.get_context(pool.start_method)
        self.pool, self.index = pool, index
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=worker_main, args=(child, pool.init_args),
                                name=f"heinfer-worker-{index}", daemon=True)
        self.proc.start()
        child.close()
        self.inbox: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self.job: _Job | None = None
        self.ready = self.dead = False
        self.recent: OrderedDict[str, None] = OrderedDict()  # sessions it ran lately
        threading.Thread(target=self._serve, name=f"heinfer-pipe-{index}", daemon=True).start()

    def _serve(self) -> None:  # in its own thread
        post = self.pool._post
        try:
            self.conn.recv()  # ("ready", pid) once imports are done
        except (EOFError, OSError):
            return post(self.pool._died, self)
        post(self.pool._ready, self)
        while True:
            try:
                job = self.inbox.get(timeout=0.5)
            except queue.Empty:  # idle: notice a kill now, not at the next request
                if not self.proc.is_alive():
                    return post(self.pool._died, self)
                continue
            if job is None:
                try:
                    self.conn.send(None)
                except OSError:
                    pass
                return
            try:
                self.conn.send((job.fn, job.args))
            except (OSError, EOFError):
                return post(self.pool._died, self)
            except Exception as e:  # arguments that do not pickle: a bug, this job's alone
                post(self.pool._finished, self, job, "err", (e, None))
                continue
            try:
                self.conn.recv()  # ("start", None): from here on the job has begun
                post(self.pool._started, self, job)
                kind, payload = self.conn.recv()
            except (OSError, EOFError):
                return post(self.pool._died, self)
            post(self.pool._finished, self, job, kind, payload)


class EvalPool:
    """Bounded, fair, crash-isolated admission in front of the worker processes."""

    def __init__(self, *, workers: int, max_queue: int, start_method: str, cache_models: int,
                 key_cache_bytes: int, key_cache_tenant_bytes: int, max_crashes: int = 3,
                 crash_window_s: float = 600.0, metrics=None):
        self.workers = workers
        self.capacity = workers + max_queue
        self.tenant_capacity = min(self.capacity, workers + math.ceil(max_queue / 2))
        self.start_method = start_method
        self.init_args = (os.getpid(), cache_models, key_cache_bytes, key_cache_tenant_bytes)
        self._metrics = metrics
        self.max_crashes, self.crash_window_s = max_crashes, crash_window_s
        self._crashes: dict[str, deque[float]] = {}  # tenant -> times its requests crashed
        self._queues: dict[str, deque[_Job]] = {}
        self._served: dict[str, int] = {}  # tenant -> dispatch number of its last job
        self._dispatches = 0
        self._slots: list[_Worker] = []
        self._pending = 0
        self._by_tenant: dict[str, int] = {}
        self._eval_avg = 1.0  # seconds, moving average, for Retry-After
        self._loop: asyncio.AbstractEventLoop | None = None
        self._warm: asyncio.Future | None = None
        self._start_failures = 0
        self._closing = False
        self.ready = False

    @property
    def pending(self) -> int:
        return self._pending

    async def warm_up(self) -> None:
        """Start every worker now (imports take a second each), then report ready."""
        self._loop = asyncio.get_running_loop()
        self._warm = self._loop.create_future()
        self._slots = [_Worker(self, i) for i in range(self.workers)]
        await self._warm
        self.ready = True

    def retry_after(self) -> int:
        return max(1, math.ceil(self._eval_avg * self._pending / self.workers))

    # -- submitting ---------------------------------------------------------------------------
    async def run(self, fn: Callable, *args: Any, timeout: float, queue: bool = True,
                  tenant: str = "", affinity: str | None = None) -> Any:
        """Run fn(*args) in a worker for `tenant`. `queue=False` jobs (admin, start-up) are
        never refused: they are rare and must not fail because predicts are busy. `affinity`
        (a session id) prefers the worker that ran it last."""
        if queue:
            self._refuse_crasher(tenant)
            if self._pending >= self.capacity:
                self._reject(f"all {self.workers} workers busy and "
                             f"{self.capacity - self.workers} request(s) waiting")
            if self._by_tenant.get(tenant, 0) >= self.tenant_capacity:
                self._reject(f"this API key already has {self.tenant_capacity} requests "
                             "running or waiting (the per-key share of the queue)")
        loop = self._loop or asyncio.get_running_loop()
        self._loop = loop
        job = _Job(fn, args, tenant, affinity, queue, loop.create_future())
        if queue:
            self._pending += 1
            self._by_tenant[tenant] = self._by_tenant.get(tenant, 0) + 1
            self._gauge()
        self._enqueue(job)
        self._dispatch()
        try:
            return await asyncio.wait_for(asyncio.shield(job.future), timeout)
        except TimeoutError:
            self._abandon(job, kill=True)
            raise ApiError("timeout", f"evaluation took longer than the {timeout:g} s "
                           "limit") from None
        except asyncio.CancelledError:  # the request went away: drop it if not started
            self._abandon(job, kill=False)
            raise

    def _refuse_crasher(self, tenant: str) -> None:
        times = self._crashes.get(tenant)
        if not times:
            return
        now = time.monotonic()
        while times and now - times[0] > self.crash_window_s:
            times.popleft()
        if not times:
            del self._crashes[tenant]
        elif len(times) >= self.max_crashes:
            wait = math.ceil(self.crash_window_s - (now - times[0]))
            raise ApiError("too_many_crashes", f"{len(times)} requests of this API key killed "
                           f"the worker evaluating them in the last {self.crash_window_s:g} s; "
                           "its requests are refused until the oldest is older than that",
                           headers={"Retry-After": str(max(1, wait))})

    def _reject(self, why: str) -> None:
        if self._metrics:
            self._metrics.queue_rejections.inc()
        raise ApiError("overloaded", f"{why}; retry later",
                       headers={"Retry-After": str(self.retry_after())})

    def _enqueue(self, job: _Job, front: bool = False) -> None:
        job.state = "queued"
        dq = self._queues.setdefault(job.tenant, deque())
        dq.appendleft(job) if front else dq.append(job)

    def _dispatch(self) -> None:
        """Give idle workers the next jobs, one tenant after another."""
        while self._queues:
            idle = [w for w in self._slots if w.ready and not w.dead and w.job is None]
            if not idle:
                return
            tenant = min(self._queues, key=lambda t: self._served.get(t, -1))
            dq = self._queues[tenant]
            job = dq.popleft()
            if not dq:
                del self._queues[tenant]
            self._dispatches += 1
            self._served[tenant] = self._dispatches
            if len(self._served) > 10_000:  # forget tenants long idle, not a leak
                for t in sorted(self._served, key=self._served.get)[:5_000]:
                    del self._served[t]
            w = next((w for w in idle if job.affinity in w.recent), None) or min(
                idle, key=lambda w: len(w.recent))
            if job.affinity:
                w.recent[job.affinity] = None
                w.recent.move_to_end(job.affinity)
                while len(w.recent) > 64:
                    w.recent.popitem(last=False)
            w.job, job.state, job.started_at = job, "assigned", time.perf_counter()
            w.inbox.put(job)

    def _abandon(self, job: _Job, *, kill: bool) -> None:
        job.abandoned = True
        if job.state == "queued":
            dq = self._queues.get(job.tenant)
            if dq is not None and job in dq:
                dq.remove(job)
                if not dq:
                    del self._queues[job.tenant]
            self._release(job)
        elif job.state in ("assigned", "running") and kill:
            w = next((w for w in self._slots if w.job is job), None)
            if w is not None and not w.dead:
                log.warning("stopping a worker whose job ran out of time",
                            extra={"pid": w.proc.pid})
                w.proc.kill()  # its thread sees the pipe close: _died replaces it
        if not job.future.done():
            job.future.cancel()

    def _release(self, job: _Job) -> None:
        if job.state == "done":
            return
        job.state = "done"
        if job.counted:
            self._pending -= 1
            left = self._by_tenant.get(job.tenant, 1) - 1
            if left:
                self._by_tenant[job.tenant] = left
            else:
                self._by_tenant.pop(job.tenant, None)
            self._gauge()

    def _gauge(self) -> None:
        if self._metrics:
            self._metrics.queue_depth.set(self._pending)

    # -- events posted by the pipe threads ----------------------------------------------------
    def _post(self, fn: Callable, *args: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop closed (shutdown)
            pass

    def _ready(self, w: _Worker) -> None:
        w.ready = True
        self._start_failures = 0
        if self._metrics:
            self._metrics.workers.set(sum(s.ready and not s.dead for s in self._slots))
        if self._warm is not None and not self._warm.done() and all(
                s.ready for s in self._slots):
            self._warm.set_result(None)
        self._dispatch()

    def _started(self, w: _Worker, job: _Job) -> None:
        if job.state == "assigned":
            job.state = "running"

    def _finished(self, w: _Worker, job: _Job, kind: str, payload: Any) -> None:
        w.job = None
        self._release(job)
        self._eval_avg = 0.8 * self._eval_avg + 0.2 * (time.perf_counter() - job.started_at)
        if not job.future.done():
            if kind == "ok":
                job.future.set_result(payload)
            else:
                exc, tb = payload
                if tb:
                    exc.__cause__ = RemoteTraceback(tb)
                job.future.set_exception(exc)
        self._dispatch()

    def _died(self, w: _Worker) -> None:
        if w.dead:
            return
        w.dead = True
        w.proc.join(timeout=1)
        w.conn.close()
        job, w.job = w.job, None
        if self._closing:
            return
        code = w.proc.exitcode
        how = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        if job is not None and job.abandoned:
            self._release(job)
        elif not w.ready:
            self._start_failures += 1
            log.error("worker exited while starting", extra={"pid": w.proc.pid, "how": how})
            if self._start_failures >= 3 and self._warm is not None and not self._warm.done():
                self._warm.set_exception(RuntimeError(
                    f"worker processes exit while starting ({how}); see the log"))
                return
        else:
            during = "request" if job is not None and job.state == "running" else "idle"
            if self._metrics:
                self._metrics.worker_crashes.labels(during).inc()
            log.error("worker died", extra={"pid": w.proc.pid, "how": how, "during": during})
            if job is not None and during == "request":
                self._crashes.setdefault(job.tenant, deque()).append(time.monotonic())
                self._release(job)
                if not job.future.done():
                    job.future.set_exception(ApiError(
                        "worker_crashed", f"the worker evaluating this request died ({how}); "
                        "other requests were not affected. Not retried: the same request could "
                        "end the same way"))
            elif job is not None:  # sent but not begun: run it on a fresh worker
                job.attempts += 1
                if job.attempts >= MAX_ATTEMPTS:
                    self._release(job)
                    if not job.future.done():
                        job.future.set_exception(ApiError(
                            "worker_crashed", f"{MAX_ATTEMPTS} workers died before this "
                            "request could start; see the server log"))
                else:
                    self._enqueue(job, front=True)
        if self._metrics:
            self._metrics.workers.set(sum(s.ready and not s.dead for s in self._slots))
        delay = min(30.0, 0.5 * 2 ** self._start_failures) if self._start_failures else 0.0
        self._loop.call_later(delay, self._respawn, w.index)

    def _respawn(self, index: int) -> None:
        if not self._closing and self._slots[index].dead:
            self._slots[index] = _Worker(self, index)

    def shutdown(self, grace: float = 5.0) -> None:
        """Stop the workers: each ends after its current job, or is killed after `grace`."""
        self._closing = True
        for w in self._slots:
            w.inbox.put(None)
        deadline = time.monotonic() + grace
        for w in self._slots:
            w.proc.join(timeout=max(0.0, deadline - time.monotonic()))
            if w.proc.is_alive():
                w.proc.kill()
                w.proc.join(timeout=1)
