"""The Python SDK: from nothing to an encrypted prediction in five lines.

    from heinfer_client import Client
    c = Client("http://127.0.0.1:8000", api_key)  # or Client(): HEINFER_URL/_API_KEY, config
    m = c.model("fmnist-cryptonets")     # public spec; refused if below 128-bit security
    s = m.session()                      # keys made (or reused) locally; evaluation keys uploaded
    p = s.predict(image)                 # uint8 pixels (floats: normalized=True): p.label, ...

What goes over the wire: evaluation keys (relinearization + Galois keys for exactly the spec's
rotation steps) once per session, then ciphertexts. The secret key is made here, stored in the
local key store (owner-only permissions) and never sent. Keys are pinned to the plan hash they
were made for; a model that changes plan answers 409 (`PlanChangedError`).

Retries: `predict` has no side effects, so it is retried on connection errors, dropped
connections and 503 (queue full: waits Retry-After), with exponential backoff. Other calls
are retried only when the request certainly did not reach the server (connect errors) or the
server refused it before doing anything (503, and the pacing 429s `rate_limited` and
`too_many_uploads`: the SDK waits the server's Retry-After when it is at most
`max_retry_after` seconds, else raises `QuotaExceededError` with `.retry_after` set). Other
429s are final: a storage quota does not free itself, and retrying after `too_many_bad_keys`
or `too_many_crashes` would only extend the block. A refused TCP connection (nothing listening)
is reported at once, not retried, unless `Client(refused_wait=S)` asks to ride through a
restart. A request whose evaluation killed a server worker (`worker_crashed`) is never
retried, whatever its status: the same input would end the same way on the next worker
(`FINAL_CODES`).
"""

from __future__ import annotations

import errno
import json
import random
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from heinfer import __version__
from heinfer.codec import finish_output
from heinfer.errors import InsecureParamsError, ParamsMismatchError
from heinfer.plan import PLAN_FORMAT_VERSION, ModelSpec
from heinfer_client import errors
from heinfer_client.config import Resolved, resolve
from heinfer_client.images import load_inputs, to_model_input
from heinfer_client.keys import LocalKeys, check_backend
from heinfer_client.keystore import Keystore

BINARY = "application/octet-stream"
RETRY_STATUSES = {503}
# 429s that only ask the client to slow down: refused before any work, safe to send again
PACING_CODES = {"rate_limited", "too_many_uploads"}
FINAL_CODES = {"worker_crashed"}  # never retried, even under a retryable status
SAFE = "safe"  # retry on any transport error: the call has no side effects
CONNECT = "connect"  # retry only when the request cannot have reached the server
NEVER = "never"


@dataclass
class Prediction:
    """One decrypted answer, with what it cost."""

    logits: np.ndarray
    label: int
    label_name: str | None
    probabilities: np.ndarray
    seconds: float  # round trip: encrypt + upload + server + download + decrypt
    server_ms: float | None  # HE evaluation inside the server worker
    bytes_sent: int
    bytes_received: int
    request_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "label_name": self.label_name,
                "probabilities": [round(float(p), 6) for p in self.probabilities],
                "logits": [float(v) for v in self.logits], "seconds": round(self.seconds, 4),
                "server_ms": self.server_ms, "bytes_sent": self.bytes_sent,
                "bytes_received": self.bytes_received, "request_id": self.request_id}


def softmax(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64).reshape(-1)
    e = np.exp(z - z.max())
    return e / e.sum()


class Client:
    """A connection to one heinfer server with one API key.

    `url`, `api_key` and `verify` default to HEINFER_URL, HEINFER_API_KEY, HEINFER_CACERT,
    then the config file (heinfer_client.config: ~/.config/heinfer/config.toml), then
    http://127.0.0.1:8000 and no key. `transport` (an httpx transport) lets tests drive the
    client from a function (`httpx.MockTransport`) or record what is sent. `verify` is passed
    to httpx: a CA bundle path for a server with a private certificate. A refused connection
    is reported at once; `refused_wait` seconds of retries ride through a server restart.
    A pacing 429 (`rate_limited`, `too_many_uploads`) is waited out when its Retry-After is at
    most `max_retry_after` seconds."""

    def __init__(self, url: str | None = None, api_key: str | None = None, *,
                 transport: httpx.BaseTransport | None = None,
                 keystore: Keystore | str | Path | None = None, allow_insecure: bool = False,
                 retries: int = 6, backoff: float = 0.25, max_backoff: float = 8.0,
                 timeout: float = 600.0, verify: bool | str | ssl.SSLContext = True,
                 refused_wait: float = 0.0, max_retry_after: float = 60.0,
                 config: Resolved | None = None):
        self.config = config or resolve(
            url=url, api_key=api_key, flags=False, with_admin=False,
            cacert=verify if isinstance(verify, str) else None,
            keystore=None if keystore is None or isinstance(keystore, Keystore) else
            str(keystore))
        self.url = self.config.url
        self.api_key = self.config.api_key
        self.allow_insecure = allow_insecure
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.refused_wait = refused_wait
        self.max_retry_after = max_retry_after
        self.keystore = keystore if isinstance(keystore, Keystore) else Keystore(
            self.config.keystore)
        if verify is True and self.config.cacert:
            verify = self.config.cacert
        if isinstance(verify, str):  # a CA bundle for a server with a private certificate
            verify = ssl.create_default_context(cafile=verify)
        headers = {"User-Agent": f"heinfer-client/{__version__}"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        self._http = httpx.Client(base_url=self.url, transport=transport, headers=headers,
                                  timeout=httpx.Timeout(timeout, connect=10.0), verify=verify)

    # -- plumbing ---------------------------------------------------------------------------
    def request(self, method: str, path: str, *, retry: str = CONNECT,
                **kwargs: Any) -> httpx.Response:
        """One API call with the retry policy `retry`; problems become `errors.APIError`s."""
        attempt = 0
        refused_at: float | None = None
        while True:
            try:
                r = self._http.request(method, path, **kwargs)
            except (httpx.ConnectError, httpx.ConnectTimeout) as e:
                err: Exception = e
                # refused: nothing listens there (a wrong URL, a stopped server): reported at
                # once unless the caller asked to ride through restarts (`refused_wait`)
                if _refused(e):
                    refused_at = refused_at or time.monotonic()
                    retryable = retry != NEVER and (
                        time.monotonic() - refused_at < self.refused_wait)
                else:
                    retryable = retry != NEVER
            except httpx.TransportError as e:  # sent, then the connection broke
                err, retryable = e, retry == SAFE
            else:
                if (r.status_code in RETRY_STATUSES and retry != NEVER
                        and attempt < self.retries and _code(r) not in FINAL_CODES):
                    self._sleep(attempt, _retry_after(r))
                    attempt += 1
                    continue
                if (r.status_code == 429 and _code(r) in PACING_CODES and retry != NEVER
                        and attempt < self.retries):
                    wait = _retry_after(r)
                    if wait is not None and wait <= self.max_retry_after:
                        # the server said when: wait that long (not capped by max_backoff,
                        # which would only hit the same limit again)
                        time.sleep(wait + 0.05 + 0.25 * random.random())
                        attempt += 1
                        continue
                if r.is_error:
                    raise _problem(r, self.config)
                return r
            if not retryable or attempt >= self.retries:
                what = ("connection refused: is the server running at this address?"
                        if _refused(err) else repr(err))
                raise errors.TransportError(f"{method} {self.url}{path}: {what} (after "
                                            f"{attempt + 1} attempt(s))") from err
            self._sleep(attempt, None)
            attempt += 1

    def _sleep(self, attempt: int, retry_after: float | None) -> None:
        wait = min(self.max_backoff, self.backoff * 2**attempt)
        if retry_after is not None:
            wait = min(self.max_backoff, max(wait, retry_after))
        time.sleep(wait * (0.75 + 0.5 * random.random()))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- service -------------------------------------------------------------------------------
    def health(self, ready: bool = True) -> dict:
        return self.request("GET", f"/v1/health/{'ready' if ready else 'live'}",
                            retry=NEVER).json()

    def wait_ready(self, timeout: float = 60.0) -> dict:
        """Poll readiness until `timeout` seconds have passed (bounded)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.health(ready=True)
            except (errors.TransportError, errors.ServerBusyError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def models(self) -> list[dict]:
        return self.request("GET", "/v1/models", retry=SAFE).json()

    def model(self, name: str) -> Model:
        """A model's public spec, checked: parameters at 128-bit security (unless the client
        was built with allow_insecure=True), a plan format this heinfer reads."""
        return Model(self, self.request("GET", f"/v1/models/{name}", retry=SAFE).json())

    def add_model(self, plan_json: str | Path, *, name: str | None = None,
                  replace: bool = False, force: bool = False) -> dict:
        """Admin: upload NAME.plan.json and its NAME.plan.npz (Plan.save output). The server
        refuses a plan without a passed check record unless `force`."""
        plan_json = Path(plan_json)
        npz = Path(str(plan_json).removesuffix(".json") + ".npz")
        if not plan_json.name.endswith(".plan.json") or not npz.exists():
            raise FileNotFoundError(f"expected NAME.plan.json with NAME.plan.npz beside it, got "
                                    f"{plan_json}")
        params: dict[str, Any] = {"replace": str(replace).lower()}
        if force:
            params["force"] = "true"
        if name:
            params["name"] = name
        with open(plan_json, "rb") as fj, open(npz, "rb") as fn:
            files = {"plan_json": (plan_json.name, fj, "application/json"),
                     "plan_npz": (npz.name, fn, "application/octet-stream")}
            return self.request("POST", "/v1/models", params=params, files=files,
                                retry=NEVER).json()

    def remove_model(self, name: str) -> None:
        self.request("DELETE", f"/v1/models/{name}", retry=CONNECT)

    def sessions(self) -> list[dict]:
        return self.request("GET", "/v1/sessions", retry=SAFE).json()

    def delete_session(self, session_id: str) -> None:
        self.request("DELETE", f"/v1/sessions/{session_id}", retry=CONNECT)


class Model:
    """A served model as the client sees it: spec, limits, preprocessing, sessions."""

    def __init__(self, client: Client, info: dict):
        self.client = client
        self.info = info
        self.name: str = info["name"]
        try:
            self.spec = ModelSpec.model_validate(info["spec"])
        except InsecureParamsError as e:
            raise errors.InsecureSpecError(f"model {self.name}: {e}") from e
        params = self.spec.params
        if (params.insecure or params.security_bits() < 128) and not client.allow_insecure:
            raise errors.InsecureSpecError(
                f"model {self.name} uses {params.describe()}: below 128-bit security. Refusing "
                "to make keys for it (Client(..., allow_insecure=True) for tests only)")
        if self.spec.plan_format != PLAN_FORMAT_VERSION:
            raise errors.IncompatibleSpecError(
                f"model {self.name} has plan format {self.spec.plan_format}; this client reads "
                f"{PLAN_FORMAT_VERSION}: upgrade heinfer")
        try:
            check_backend(self.spec)
        except ParamsMismatchError as e:
            raise errors.IncompatibleSpecError(f"model {self.name}: {e}") from e
        if self.spec.plan_hash != info.get("plan_hash"):
            raise errors.IncompatibleSpecError("spec and model disagree on the plan hash")
        self.limits: dict = info.get("limits", {})
        self.preprocessing: dict | None = info.get("preprocessing")

    @property
    def plan_hash(self) -> str:
        return self.spec.plan_hash

    @property
    def labels(self) -> list[str]:
        return self.spec.output.labels

    def preprocess(self, x: np.ndarray, normalized: bool = False) -> np.ndarray:
        """The model's input from uint8 pixels (scaled to [0, 1], normalized with the mean/std
        the model publishes), or from floats already normalized (`normalized=True` only: a
        float array is never guessed to be either). The shape must be the spec's up to size-1
        dimensions; a channel-count mismatch or a batch is an InputError
        (heinfer_client.images.to_model_input)."""
        return to_model_input(x, self.spec.input_shape,
                              (self.preprocessing or {}).get("normalization"),
                              normalized=normalized, model=f"model {self.name}")

    def load(self, path: str | Path, *, batch: bool = False,
             convert: str | None = None) -> list[np.ndarray]:
        """Inputs from a file, checked against this model: an image (Pillow: PNG, JPEG, ...;
        `convert="grey"`/`"rgb"` when its channels differ from the model's) as uint8 pixels,
        or a .npy array (a batch along its first dimension only with `batch=True`)."""
        return load_inputs(path, self.spec.input_shape, batch=batch,
                           convert=convert)  # type: ignore[arg-type]

    def keys(self) -> LocalKeys:
        """This model's keys from the local key store, made (and stored 0600) if absent."""
        entry = self.client.keystore.entry(self.client.url, self.name, self.plan_hash)
        if entry.exists():
            return LocalKeys(self.spec, entry.read_secret())
        keys = LocalKeys(self.spec)
        entry.write(keys.secret_key_bytes(),
                    self.client.keystore.new_meta(self.client.url, self.name, self.spec))
        return keys

    def session(self, *, reuse: bool = True,
                progress: Callable[[int, int], None] | None = None) -> Session:
        """A session on the server holding this client's evaluation keys. With `reuse`, a
        session this API key made earlier for the same plan is used again when still alive
        (no key upload). `progress(sent, total)` is called as the key upload goes (bytes)."""
        keys = self.keys()
        entry = self.client.keystore.entry(self.client.url, self.name, self.plan_hash)
        if reuse and (sid := entry.session_for(self.client.api_key)):
            try:
                info = self.client.request("GET", f"/v1/sessions/{sid}", retry=SAFE).json()
                if info.get("plan_hash") == self.plan_hash:
                    return Session(self, keys, info, uploaded_bytes=0)
            except (errors.NotFoundError, errors.SessionExpiredError):
                pass
        return Session.create(self, keys, progress=progress)


class _Upload:
    """A body sent in chunks with a progress callback; iterable again for a retry (httpx sends
    it with the Content-Length header we set, not chunked)."""

    CHUNK = 1 << 20

    def __init__(self, body: bytes, progress: Callable[[int, int], None]):
        self.body, self.progress = body, progress

    def __iter__(self) -> Iterator[bytes]:
        view = memoryview(self.body)
        for start in range(0, len(view), self.CHUNK):
            yield bytes(view[start:start + self.CHUNK])
            self.progress(min(start + self.CHUNK, len(view)), len(view))


class Session:
    """Evaluation keys on the server + the secret key here: encrypt, predict, decrypt."""

    def __init__(self, model: Model, keys: LocalKeys, info: dict, uploaded_bytes: int):
        self.model = model
        self.keys = keys
        self.info = info
        self.id: str = info["session_id"]
        self.key_upload_bytes = uploaded_bytes
        self._renew_lock = threading.Lock()

    @classmethod
    def create(cls, model: Model, keys: LocalKeys,
               progress: Callable[[int, int], None] | None = None) -> Session:
        body = keys.eval_keys_wire()
        limit = model.limits.get("max_key_bytes")
        if limit is not None and len(body) > limit:
            raise errors.PayloadTooLargeError(
                413, "payload_too_large", f"evaluation keys of {len(body):,} bytes exceed the "
                f"server's limit of {limit:,} bytes")
        client = model.client
        info = client.request("POST", "/v1/sessions", retry=CONNECT,
                              content=_Upload(body, progress) if progress else body,
                              params={"model": model.name, "plan_hash": model.plan_hash},
                              headers={"Content-Type": BINARY,
                                       "Content-Length": str(len(body))}).json()
        keys.drop_eval_keys()
        client.keystore.entry(client.url, model.name, model.plan_hash).remember_session(
            client.api_key, info["session_id"])
        return cls(model, keys, info, uploaded_bytes=len(body))

    def _renew(self, stale_id: str) -> None:
        with self._renew_lock:
            if self.id == stale_id:  # another thread may have renewed already
                fresh = Session.create(self.model, self.keys)
                self.id, self.info = fresh.id, fresh.info
                self.key_upload_bytes += fresh.key_upload_bytes

    def encode_encrypt(self, x: np.ndarray, normalized: bool = False) -> bytes:
        return self.keys.encode_encrypt(self.model.preprocess(x, normalized))

    def decrypt_decode(self, body: bytes) -> np.ndarray:
        return self.keys.decrypt_decode(body, self.model.limits.get("max_ciphertext_bytes"))

    def predict_encrypted(self, body: bytes) -> httpx.Response:
        """POST framed ciphertexts; renews the session once if it expired or vanished."""
        client = self.model.client
        for attempt in (0, 1):
            sid = self.id
            try:
                return client.request(
                    "POST", f"/v1/models/{self.model.name}/predict", retry=SAFE, content=body,
                    params={"session_id": sid, "plan_hash": self.model.plan_hash},
                    headers={"Content-Type": BINARY})
            except (errors.SessionExpiredError, errors.NotFoundError) as e:
                if attempt or e.code not in ("session_expired", "unknown_session"):
                    raise
                self._renew(sid)
        raise AssertionError("unreachable")

    def predict(self, x: np.ndarray, *, normalized: bool = False) -> Prediction:
        """Encrypt one input (uint8 pixels, or floats with `normalized=True`: see
        Model.preprocess), evaluate it on the server, decrypt: logits, label, probabilities,
        and the time and bytes it took."""
        t0 = time.perf_counter()
        x = self.model.preprocess(x, normalized)  # checked before anything is encrypted
        body = self.keys.encode_encrypt(x)
        r = self.predict_encrypted(body)
        decoded = np.asarray(self.decrypt_decode(r.content), dtype=np.float64).reshape(-1)
        # conformal models finish on the client, which knows x (see heinfer.codec)
        logits = finish_output(self.model.spec, decoded, x)
        seconds = time.perf_counter() - t0
        label = int(np.argmax(logits))
        names = self.model.labels
        server_ms = r.headers.get("x-heinfer-eval-ms")
        return Prediction(logits, label, names[label] if label < len(names) else None,
                          softmax(logits), seconds, float(server_ms) if server_ms else None,
                          len(body), len(r.content), r.headers.get("x-request-id"))

    def predict_batch(self, xs: Iterable[np.ndarray] | np.ndarray, *, concurrency: int = 2,
                      normalized: bool = False,
                      progress: Callable[[int, int], None] | None = None) -> list[Prediction]:
        """Predict many inputs (an array: along its leading dimension), `concurrency` requests
        in flight (encryption of the next input overlaps the server's work on the previous).
        Every input is checked before the first is sent. Results in input order."""
        items: Sequence = [self.model.preprocess(x, normalized) for x in xs]
        done = 0
        lock = threading.Lock()

        def one(x: np.ndarray) -> Prediction:
            nonlocal done
            p = self.predict(x, normalized=True)  # preprocessed above
            with lock:
                done += 1
                if progress:
                    progress(done, len(items))
            return p

        if concurrency <= 1:
            return [one(x) for x in items]
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            return list(pool.map(one, items))

    def delete(self) -> None:
        client = self.model.client
        client.delete_session(self.id)
        client.keystore.entry(client.url, self.model.name, self.model.plan_hash) \
            .remember_session(client.api_key, None)


def _refused(e: BaseException) -> bool:
    """A refused TCP connection (ECONNREFUSED) anywhere in the exception's causes."""
    seen: BaseException | None = e
    for _ in range(8):
        if seen is None:
            return False
        if isinstance(seen, ConnectionRefusedError) or getattr(
                seen, "errno", None) == errno.ECONNREFUSED:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _code(r: httpx.Response) -> str | None:
    """The problem code of an error answer, if it has one."""
    try:
        body = r.json()
    except ValueError:
        return None
    return body.get("code") if isinstance(body, dict) else None


def _retry_after(r: httpx.Response) -> float | None:
    try:
        return float(r.headers["retry-after"])
    except (KeyError, ValueError):
        return None


def _problem(r: httpx.Response, config: Resolved | None = None) -> errors.APIError:
    try:
        body = r.json()
    except (json.JSONDecodeError, ValueError):
        body = {"detail": r.text[:500]}
    body = dict(body) if isinstance(body, dict) else {}
    hint = config.explain(str(body.get("code"))) if config else None
    if hint:  # name the flag / argument, the variable and the file the key comes from
        body["detail"] = f"{body.get('detail') or 'no detail'}; {hint}"
    return errors.from_problem(r.status_code, body, _retry_after(r))


@dataclass
class WireLog:
    """Everything a client sent and received (tests: prove nothing secret leaves)."""

    requests: list[tuple[str, str, dict, bytes]] = field(default_factory=list)

    def transport(self, inner: httpx.BaseTransport | None = None) -> httpx.BaseTransport:
        log, inner = self, inner or httpx.HTTPTransport()

        class Recording(httpx.BaseTransport):
            def handle_request(self, request: httpx.Request) -> httpx.Response:
                body = request.read()
                log.requests.append((request.method, str(request.url), dict(request.headers),
                                     body))
                return inner.handle_request(request)

            def close(self) -> None:
                inner.close()

        return Recording()
