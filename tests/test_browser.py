"""The /app page in a real browser (issue 15): Debian's headless Chromium driven by npm
playwright-core (web/test/e2e.mjs) against a real `heinfer serve` on loopback, serving
fmnist-cryptonets compiled for the Pyfhel backend (SEAL 4.1, node-seal's version). The page makes
keys, encrypts a real Fashion-MNIST image (a PNG at another size: the page resizes it), gets the
right label, and nothing the server stored or received holds the page's secret key. The
screenshot is kept under test-artifacts/ (docs/img/browser-app.png is one).

Needs /usr/bin/chromium and web/node_modules (scripts/setup.sh installs both); `make test` sets
HEINFER_REQUIRE_BROWSER=1 so that a missing browser fails instead of skipping."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from heinfer.backends import backend_available
from heinfer_client import Client
from tests.test_server_support import ALICE, http, running_server

ROOT = Path(__file__).resolve().parents[1]
WEB = ROOT / "web"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = ROOT / "test-artifacts"
READY = (Path(CHROMIUM).exists() and (WEB / "node_modules" / "playwright-core").exists()
         and shutil.which("node") is not None and backend_available("pyfhel"))
if os.environ.get("HEINFER_REQUIRE_BROWSER") == "1" and not READY:
    raise RuntimeError("the browser test needs Debian chromium, Node.js, web/node_modules "
                       "(npm ci in web/) and Pyfhel: run `make setup` (scripts/setup.sh)")
pytestmark = pytest.mark.skipif(not READY, reason="no chromium / web/node_modules / Pyfhel")
IMAGE = 0  # test image index; its label is the model's answer in the SDK too


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from heinfer_models import zoo
    from heinfer_packing.lower import lower

    d = tmp_path_factory.mktemp("browser")
    from heinfer.check import checked
    from heinfer_models import fashion_mnist

    model = zoo.load("fmnist-cryptonets")
    plan = checked(lower(model).for_backend("pyfhel"),
                   fashion_mnist.normalize(fashion_mnist.load("train")[0][:8]), model.forward)
    with running_server(d, [plan.save(d / "plans" / plan.name)]) as srv:
        srv.dir = d
        srv.model = plan.name
        yield srv


def _run_page(url: str, model: str, png: Path, shot: Path) -> dict:
    r = subprocess.run(["node", "test/e2e.mjs", url, ALICE, model, str(png), str(shot)],
                       cwd=WEB, capture_output=True, text=True, timeout=240,
                       env={**os.environ, "CHROMIUM": CHROMIUM})
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_page_predicts_a_fashion_mnist_image_and_keeps_its_secret_key(served, tmp_path):
    from PIL import Image

    from heinfer.backends.pyfhel_backend import PyfhelBackend
    from heinfer.plan import ModelSpec
    from heinfer_models import fashion_mnist
    from heinfer_server import seal_format

    images, labels = fashion_mnist.load("test")
    png = tmp_path / "shoe.png"
    Image.fromarray(images[IMAGE]).resize((140, 140), Image.Resampling.NEAREST).save(png)
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "browser-app.png"
    out = _run_page(served.url, served.model, png, shot)

    # the right label, shown with a bar per class
    assert out["index"] == int(labels[IMAGE]), out
    assert out["bars"] == 10 and out["label"] == "Ankle boot"
    assert shot.stat().st_size > 10_000
    # the page loaded nothing from elsewhere and sent exactly: the keys once, one ciphertext body
    assert all(r["url"].startswith(served.url + "/") for r in out["requests"]), out["requests"]
    posts = [r for r in out["requests"] if r["method"] == "POST"]
    assert [p["url"].split("?")[0].removeprefix(served.url) for p in posts] == [
        "/v1/sessions", f"/v1/models/{served.model}/predict"]
    assert int(out["timings"]["bytesSent"]) == posts[1]["size"]
    assert not out["consoleErrors"], out["consoleErrors"]
    assert "'unsafe-eval'" not in out["csp"] and "connect-src 'self'" in out["csp"]
    assert out["stored"] and out["stored"][0]["salt"] == 16

    # the server's stored session: public material only, and no trace of the secret key
    sk = base64.b64decode(out["secretKey"])
    with http(served.url) as c:
        (listed,) = c.get("/v1/sessions").json()
        session = c.get(f"/v1/sessions/{listed['session_id']}").json()
        spec = ModelSpec.model_validate(c.get(f"/v1/models/{served.model}").json()["spec"])
    assert session["key_bytes"] == posts[0]["size"] - 16 - 3 * 16  # the three sections
    key_dir = next((served.dir / "data" / "sessions").rglob("relin.seal")).parent
    stored = sorted(p.name for p in key_dir.iterdir())
    assert stored == ["galois.seal", "public.seal", "relin.seal", "session.json"], stored
    be = PyfhelBackend(spec.params)
    expect = seal_format.Expect.of_backend(be, spec.params.scale)
    needle = sk[len(sk) // 2: len(sk) // 2 + 64]  # 8 coefficients of the secret key
    for f in key_dir.glob("*.seal"):
        plain = bytes(seal_format.decompress(f.read_bytes(), expect, 1 << 30, f.name))
        assert needle not in plain, f.name
    meta = (key_dir / "session.json").read_bytes()
    assert needle not in meta and base64.b64encode(needle)[:40] not in meta
    # and the key really is the page's: it loads under the model's parameters
    be.he.from_bytes_secret_key(sk)

    # the Python SDK on the same server, same image: same label; round trips for the record
    c = Client(served.url, ALICE, keystore=tmp_path / "ks")
    s = c.model(served.model).session()
    t = time.perf_counter()
    p = s.predict(np.asarray(Image.open(png).resize((28, 28), Image.Resampling.NEAREST)))
    sdk_ms = (time.perf_counter() - t) * 1000
    assert p.label == out["index"]
    figures = {**out["timings"], "sdkRoundTripMs": round(sdk_ms, 1),
               "ratio": round(float(out["timings"]["roundTripMs"]) / sdk_ms, 2)}
    (ARTIFACTS / "browser-figures.json").write_text(json.dumps(figures, indent=1) + "\n")
    print("browser figures:", figures)


def test_app_is_served_with_a_strict_policy_and_no_cors(served):
    import httpx

    with httpx.Client(base_url=served.url) as c:
        r = c.get("/app/")
        assert r.status_code == 200 and "<title>heinfer" in r.text
        csp = r.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
        assert r.headers["x-content-type-options"] == "nosniff"
        w = c.get("/app/seal_throws.wasm")
        assert w.headers["content-type"] == "application/wasm" and w.content[:4] == b"\0asm"
        assert c.get("/app/missing.js").status_code == 404
        # CORS closed: no allow-origin for another origin, preflight not granted
        r = c.get("/v1/models", headers={"Origin": "https://evil.example",
                                         "Authorization": f"Bearer {ALICE}"})
        assert "access-control-allow-origin" not in r.headers
        r = c.options("/v1/models", headers={"Origin": "https://evil.example",
                                             "Access-Control-Request-Method": "GET"})
        assert "access-control-allow-origin" not in r.headers


def test_committed_page_is_the_build_of_web(tmp_path):
    """server/static/app is what `npm run build` makes from web/ and the lock file: a change to
    web/src without `make web` (or a hand edit of the bundle) fails here."""
    r = subprocess.run(["node", "build.mjs"], cwd=WEB, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "HEINFER_WEB_OUT": f"{tmp_path}/"})
    assert r.returncode == 0, r.stderr[-2000:]
    committed = ROOT / "server" / "static" / "app"
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(p.name for p in committed.iterdir())
    for n in names:
        assert (tmp_path / n).read_bytes() == (committed / n).read_bytes(), f"{n}: run `make web`"


@pytest.mark.parametrize("name", ["fmnist-cryptonets", "fmnist-alexnet", "fmnist-conformal-1",
                                  "fmnist-polyconv-8", "fmnist-tenseal-tutorial"])
def test_page_packs_and_reads_like_the_sdk(name):
    """web/src/heinfer.js (what the page runs) against heinfer.codec (what the SDK runs), slot
    for slot, through the same spec JSON: packing, output reading and conformal finishing."""
    from heinfer.codec import finish_output
    from heinfer.plan import ModelSpec
    from heinfer_models import zoo
    from heinfer_packing.conformal import ConformalNet, lower_conformal
    from heinfer_packing.lower import lower

    model = zoo.load(name)
    plan = (lower_conformal(model, name, model.metadata.get("labels"))[0]
            if isinstance(model, ConformalNet) else lower(model))
    spec = ModelSpec.model_validate_json(plan.spec().model_dump_json())  # as a client reads it
    rng = np.random.default_rng(5)
    x = rng.standard_normal(spec.input_shape)
    vectors = [rng.standard_normal(spec.packing.slots)
               for _ in range(spec.packing.output.ciphertexts)]
    doc = {"spec": json.loads(spec.model_dump_json()), "x": x.reshape(-1).tolist(),
           "vectors": [v.tolist() for v in vectors]}
    r = subprocess.run(["node", "test/contract.mjs"], cwd=WEB, input=json.dumps(doc),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    js = json.loads(r.stdout)
    want = spec.pack(x)
    got = [np.zeros(spec.packing.slots) for _ in want]
    for ct, slot, val in js["nonzero"]:
        got[ct][slot] = val
    for c, (w, g) in enumerate(zip(want, got, strict=True)):
        assert np.array_equal(w, g), (name, c, np.flatnonzero(w != g)[:5])
    decoded = spec.decode(vectors)
    assert np.array_equal(np.asarray(js["decoded"]), decoded.reshape(-1))
    np.testing.assert_allclose(js["logits"], finish_output(spec, decoded, x).reshape(-1),
                               rtol=1e-12, atol=1e-12)
