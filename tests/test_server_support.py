"""Helpers shared by the service tests (no tests here): tiny models compiled to plans at small
*insecure* parameters (real CKKS, fast), API keys, and a real `heinfer serve` process on
127.0.0.1 with its data directory under tmp_path."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np

from heinfer import wire
from heinfer.check import checked
from heinfer.plan import ModelSpec
from heinfer_client.keys import LocalKeys
from heinfer_client.local import LocalServer
from heinfer_packing.lower import lower
from heinfer_packing.modelfile import Layer, Model
from tests.conftest import small_params

ADMIN = "admin-Zq8vT4mW1xK9pL2rN7sB"
ALICE = "alice-Hc3jR6yU0eQ5wA8dF1gV"
BOB = "bob-Lm2nP5tX9cV4bZ7kJ0hS3q"
CAROL = "carol-Yw6eT1uI8oP3aS5dG9fH"
CLIENT_KEYS = f"alice:{ALICE},bob:{BOB},carol:{CAROL}"


def tiny_model(name: str = "tiny", seed: int = 0) -> Model:
    """conv 2x3x3 on a 1x6x6 input, x^2-style activation, dense 3: depth 3, one ciphertext in."""
    rng = np.random.default_rng(seed)
    return Model(name, (1, 6, 6), [
        Layer("conv1", "conv2d", {"stride": 1, "padding": 0}, rng.normal(0, 0.3, (2, 1, 3, 3)),
              rng.normal(0, 0.1, 2)),
        Layer("act1", "poly", {"coeffs": [0.0, 0.5, 0.25]}),
        Layer("flatten", "flatten"),
        Layer("fc", "dense", {}, rng.normal(0, 0.3, (3, 32)), rng.normal(0, 0.1, 3)),
    ], labels=["ant", "bee", "cat"], metadata={"normalization": {"mean": 0.5, "std": 0.25}})


def tiny_plan(directory: Path, name: str = "tiny", seed: int = 0, depth: int = 3) -> Path:
    """Compile the tiny model (depth 3 at small_params(depth)) and save NAME.plan.json/.npz."""
    model = tiny_model(name, seed)
    plan = lower(model, small_params(depth), first_conv="rotation")
    xs = np.random.default_rng(seed).uniform(-1, 1, (8, *model.input_shape))
    return checked(plan, xs, model.forward).save(Path(directory) / name)


def server_env(**extra: object) -> dict[str, str]:
    env = {"HEINFER_ADMIN_KEY": ADMIN, "HEINFER_API_KEYS": CLIENT_KEYS,
           "HEINFER_ALLOW_INSECURE_PARAMS": "true", "HEINFER_WORKERS": "1",
           "HEINFER_GENERATE_KEYS": "false", "HEINFER_SWEEP_INTERVAL_S": "1"}
    env.update({f"HEINFER_{k.upper()}": str(v) for k, v in extra.items()})
    return env


@contextmanager
def running_server(tmp_path: Path, plans: list[Path] = (), args: list[str] | None = None,
                   **settings: object):
    srv = LocalServer(tmp_path / "data", env=server_env(**settings),
                      args=(["--plan", ",".join(map(str, plans))] if plans else []) +
                      list(args or []))
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def http(url: str, key: str | None = ALICE) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=url, headers=headers, timeout=60)


def problem(r: httpx.Response, status: int, code: str) -> dict:
    """Assert a problem+json answer with this status and code; return its body."""
    assert r.status_code == status, (r.status_code, r.text[:500])
    assert r.headers["content-type"].startswith("application/problem+json"), r.headers
    body = r.json()
    assert body["code"] == code, body
    assert body["status"] == status and body["detail"] and body["request_id"]
    assert body["request_id"] == r.headers["x-request-id"]
    return body


def spec_of(c: httpx.Client, model: str) -> ModelSpec:
    r = c.get(f"/v1/models/{model}")
    r.raise_for_status()
    return ModelSpec.model_validate(r.json()["spec"])


def new_session(c: httpx.Client, model: str, keys: LocalKeys) -> str:
    r = c.post("/v1/sessions", params={"model": model}, content=keys.eval_keys_wire(),
               headers={"Content-Type": "application/octet-stream"})
    assert r.status_code == 201, r.text
    return r.json()["session_id"]


def post_keys(c: httpx.Client, model: str, body: bytes, **params: str) -> httpx.Response:
    return c.post("/v1/sessions", params={"model": model, **params}, content=body,
                  headers={"Content-Type": "application/octet-stream"})


def post_predict(c: httpx.Client, model: str, session_id: str, body: bytes,
                 content_type: str = "application/octet-stream", **params: str) -> httpx.Response:
    return c.post(f"/v1/models/{model}/predict", params={"session_id": session_id, **params},
                  content=body, headers={"Content-Type": content_type})


def decrypt(keys: LocalKeys, r: httpx.Response) -> np.ndarray:
    assert r.status_code == 200, r.text[:500]
    assert r.headers["content-type"] == "application/octet-stream"
    return keys.decrypt_decode(r.content)


def ct_body(keys: LocalKeys, x: np.ndarray) -> bytes:
    return keys.encode_encrypt(x)


def frame(*items: bytes) -> bytes:
    return wire.encode_ciphertexts(list(items))
