"""05: the service round trip: a real `heinfer serve` on loopback, the model owner adds a checked
plan, a client encrypts, the server evaluates without the secret key, the client decrypts.

    .venv/bin/python examples/05_service_round_trip.py

In production the three roles are separate machines: `heinfer serve` (docs/SERVICE.md), the
model owner's `heinfer compile` + `heinfer models add`, and the client's SDK lines below.
"""

import secrets
import tempfile
from pathlib import Path

import numpy as np

from heinfer.check import checked
from heinfer_client import Client
from heinfer_client.local import LocalServer
from heinfer_models import fashion_mnist, zoo
from heinfer_packing.lower import lower

MODEL = "fmnist-tenseal-tutorial"
model = zoo.load(MODEL)
train, _ = fashion_mnist.load("train")
test, labels = fashion_mnist.load("test")

with tempfile.TemporaryDirectory() as tmp:
    # model owner: compile and check (what `heinfer compile MODEL --out PREFIX` does)
    plan = checked(lower(model), fashion_mnist.normalize(train[:8], model.input_shape),
                   model.forward)
    plan_json = plan.save(Path(tmp) / MODEL)

    admin_key, api_key = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    env = {"HEINFER_ADMIN_KEY": admin_key, "HEINFER_API_KEYS": f"alice:{api_key}",
           "HEINFER_WORKERS": "1", "HEINFER_GENERATE_KEYS": "false",
           "HEINFER_LOG_LEVEL": "warning"}
    with LocalServer(Path(tmp) / "data", env=env) as server:
        with Client(server.url, admin_key) as admin:
            admin.add_model(plan_json)  # refused without the check record, unless forced

        # the client: five lines (keys made locally; only public evaluation keys are sent)
        with Client(server.url, api_key, keystore=Path(tmp) / "keys") as c:
            session = c.model(MODEL).session()
            for img, label in zip(test[:3], labels[:3], strict=True):
                p = session.predict(img[None])  # uint8 pixels, normalized as the model says
                plain = model.forward(fashion_mnist.normalize(img[None], model.input_shape)[0])
                print(f"true {model.labels[label]:<12} predicted {model.labels[p.label]:<12} "
                      f"(p={p.probabilities[p.label]:.2f}), max logit error "
                      f"{np.abs(p.logits - plain).max():.1e}, {p.bytes_sent / 1e3:.0f} KB up")
                assert p.label == int(np.argmax(plain))
print("OK")
