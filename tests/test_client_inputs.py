"""The input contract of the SDK and the CLI, on real Fashion-MNIST images (PNG and JPEG made
here with Pillow): uint8 pixels, or floats only when said to be normalized; a channel-count
mismatch or an unasked batch is an error; images in any mode, refused with a reason when they
cannot be taken as they are. The CLI runs as a subprocess against a real `heinfer serve` with
the shipped fmnist-cryptonets model (128-bit parameters)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from heinfer_client import Client
from heinfer_client.errors import InputError
from heinfer_client.images import load_inputs, read_image, to_model_input
from heinfer_client.local import heinfer_command
from heinfer_models import fashion_mnist
from tests.test_server_support import ALICE, running_server

SHAPE = (1, 28, 28)
NORM = {"mean": fashion_mnist.MEAN, "std": fashion_mnist.STD}


@pytest.fixture(scope="module")
def fmnist():
    images, labels = fashion_mnist.load("test")
    return images, labels


def test_arrays_uint8_or_explicitly_normalized(fmnist):
    img = fmnist[0][0]
    want = fashion_mnist.normalize(img[None])[0]
    np.testing.assert_allclose(to_model_input(img, SHAPE, NORM), want)
    np.testing.assert_allclose(to_model_input(img.astype(np.int64), SHAPE, NORM), want)
    np.testing.assert_array_equal(to_model_input(want, SHAPE, NORM, normalized=True), want)
    # a float image in [0, 1] is never guessed to be pixels or normalized values
    with pytest.raises(InputError, match=r"uint8 pixels.*normalized=True.*--normalized.*"
                                         r"float64 with values 0\.\.1.*astype\(np\.uint8\)"):
        to_model_input(img / 255.0, SHAPE, NORM)
    with pytest.raises(InputError, match="0..255"):
        to_model_input(np.full(SHAPE, 300), SHAPE, NORM)
    with pytest.raises(InputError, match="NaN"):
        to_model_input(np.full(SHAPE, np.nan), SHAPE, NORM, normalized=True)
    with pytest.raises(InputError, match="bool"):
        to_model_input(np.zeros(SHAPE, bool), SHAPE, NORM)
    # three channels for a one-channel model: an error, a batch only when asked
    three = np.stack([img] * 3)
    with pytest.raises(InputError, match=r"3 channels where .* takes 1.*predict_batch"):
        to_model_input(three, SHAPE, NORM)
    with pytest.raises(InputError, match="a batch"):
        to_model_input(three[:, None], SHAPE, NORM)


def test_npy_files_batch_only_when_asked(fmnist, tmp_path):
    imgs = fmnist[0][:3]
    np.save(tmp_path / "three.npy", imgs)  # (3, 28, 28)
    with pytest.raises(InputError, match=r"3 channels; the model takes 1.*--batch"):
        load_inputs(tmp_path / "three.npy", SHAPE)
    assert len(load_inputs(tmp_path / "three.npy", SHAPE, batch=True)) == 3
    np.save(tmp_path / "four.npy", np.stack([imgs[:, None]] * 1)[0])  # (3, 1, 28, 28)
    with pytest.raises(InputError, match=r"looks like 3 inputs.*--batch"):
        load_inputs(tmp_path / "four.npy", SHAPE)
    np.save(tmp_path / "one.npy", imgs[0])
    assert load_inputs(tmp_path / "one.npy", SHAPE)[0].shape == (28, 28)
    with pytest.raises(InputError, match=r"--batch expects shape \(N, 1, 28, 28\)"):
        load_inputs(tmp_path / "one.npy", SHAPE, batch=True)
    (tmp_path / "bad.npy").write_bytes(b"garbage")
    with pytest.raises(InputError, match="not a readable .npy"):
        load_inputs(tmp_path / "bad.npy", SHAPE)


def test_images_in_every_mode(fmnist, tmp_path):
    img = fmnist[0][0]
    grey = Image.fromarray(img, "L")
    rgb_of_grey = grey.convert("RGB")
    colour = Image.fromarray(np.dstack([img, img // 2, 255 - img]), "RGB")

    def path(name: str, im: Image.Image, **kw) -> Path:
        p = tmp_path / name
        im.save(p, **kw)
        return p

    same = [path("l.png", grey), path("rgb-grey.png", rgb_of_grey),
            path("rgba.png", rgb_of_grey.convert("RGBA")), path("la.png", grey.convert("LA")),
            path("p.png", grey.convert("P")), path("l.bmp", grey), path("l.tif", grey),
            path("l16.png", Image.fromarray(img.astype(np.uint16) * 257))]
    for p in same:
        np.testing.assert_array_equal(read_image(p, SHAPE), img[None], err_msg=p.name)
    jpeg = read_image(path("l.jpg", grey, quality=95), SHAPE)
    assert jpeg.dtype == np.uint8 and np.abs(jpeg.astype(int) - img).mean() < 3
    # colour for a one-channel model: refused unless asked, then Pillow's luma
    with pytest.raises(InputError, match=r"colour image \(mode RGB\).*1 channel.*--grey"):
        read_image(path("c.png", colour), SHAPE)
    with pytest.raises(InputError, match="colour image"):
        read_image(path("c.jpg", colour), SHAPE)
    np.testing.assert_array_equal(read_image(tmp_path / "c.png", SHAPE, convert="grey")[0],
                                  np.asarray(colour.convert("L")))
    # a three-channel model: colour as it is (CHW), grey only when asked
    assert read_image(tmp_path / "c.png", (3, 28, 28)).shape == (3, 28, 28)
    np.testing.assert_array_equal(read_image(tmp_path / "c.png", (3, 28, 28))[2], 255 - img)
    with pytest.raises(InputError, match="greyscale image.*3 channels.*--rgb"):
        read_image(tmp_path / "l.png", (3, 28, 28))
    assert (read_image(tmp_path / "l.png", (3, 28, 28), convert="rgb") == img).all()
    # what cannot be taken as it is, says why
    alpha = np.dstack([img, np.where(img > 0, 255, 0).astype(np.uint8)])
    with pytest.raises(InputError, match="transparent pixels"):
        read_image(path("t.png", Image.fromarray(alpha, "LA")), SHAPE)
    with pytest.raises(InputError, match=r"is 56x28 pixels; the model takes 28x28"):
        read_image(path("wide.png", Image.fromarray(np.hstack([img, img]))), SHAPE)
    with pytest.raises(InputError, match="floating-point image"):
        read_image(path("f.tif", Image.fromarray(img.astype(np.float32))), SHAPE)
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(InputError, match="not an image Pillow can read"):
        load_inputs(tmp_path / "notes.txt", SHAPE)
    (tmp_path / "cut.png").write_bytes((tmp_path / "l.png").read_bytes()[:60])
    with pytest.raises(InputError, match="cannot read the image"):
        read_image(tmp_path / "cut.png", SHAPE)
    with pytest.raises(InputError, match="no such file|cannot read"):
        load_inputs(tmp_path / "missing.png", SHAPE)


def _cli(tmp_path: Path, url: str, *argv: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HEINFER_")}
    env.update({"HEINFER_URL": url, "HEINFER_API_KEY": ALICE,
                "HEINFER_HOME": str(tmp_path / "ks"),
                "HEINFER_CONFIG": str(tmp_path / "none.toml"),
                "HEINFER_PROGRESS_INTERVAL": "0"})
    return subprocess.run([*heinfer_command(), "predict", "fmnist-cryptonets", *argv],
                          env=env, capture_output=True, text=True, timeout=300)


def test_cli_predict_contract_on_the_shipped_model(fmnist, tmp_path):
    """Real Fashion-MNIST images through `heinfer predict` (a subprocess) and a real server."""
    from heinfer_models import zoo
    from heinfer_packing.lower import lower

    model = zoo.load("fmnist-cryptonets")
    images, labels = fmnist
    i = int(np.flatnonzero(labels == 9)[0])  # an ankle boot
    img = images[i]
    x = fashion_mnist.normalize(img[None])[0]
    want = fashion_mnist.LABELS[int(np.argmax(model.forward(x)))]
    Image.fromarray(img).save(tmp_path / "boot.png")
    Image.fromarray(img).convert("RGB").save(tmp_path / "boot.jpg", quality=95)
    Image.fromarray(np.dstack([img, img // 2, img])).save(tmp_path / "colour.png")
    np.save(tmp_path / "unit.npy", img / 255.0)
    np.save(tmp_path / "norm.npy", x)
    np.save(tmp_path / "three.npy", fashion_mnist.normalize(images[:3])[:, 0])  # (3, 28, 28)
    from heinfer.check import checked

    plan = checked(lower(model), fashion_mnist.normalize(images[:8]), model.forward).save(
        tmp_path / "plans" / "fmnist-cryptonets")
    with running_server(tmp_path, [plan], allow_insecure_params="false") as srv:
        # refused before any key is made: each error says what to pass
        out = _cli(tmp_path, srv.url, str(tmp_path / "unit.npy"))
        assert out.returncode == 2 and "--normalized" in out.stderr and "uint8" in out.stderr
        assert out.stderr.startswith(f"heinfer: {tmp_path / 'unit.npy'}: model fmnist-cryptonets")
        assert "values 0..1" in out.stderr, out.stderr
        out = _cli(tmp_path, srv.url, str(tmp_path / "three.npy"), "--normalized")
        assert out.returncode == 2 and "3 channels" in out.stderr and "--batch" in out.stderr
        out = _cli(tmp_path, srv.url, str(tmp_path / "colour.png"))
        assert out.returncode == 2 and "--grey" in out.stderr
        assert not (tmp_path / "ks").exists()  # nothing made for a refused input
        # PNG, JPEG (grey stored as RGB) and the normalized array agree with the plaintext model
        out = _cli(tmp_path, srv.url, str(tmp_path / "boot.png"), str(tmp_path / "boot.jpg"),
                   str(tmp_path / "norm.npy"), "--normalized")
        assert out.returncode == 0, out.stderr
        lines = out.stdout.splitlines()
        assert len(lines) == 4 and all(f"  {want} " in line for line in lines[:3]), out.stdout
        # piped progress: plain lines, no bar redrawn with carriage returns
        err = out.stderr
        assert "\r" not in err
        assert "generating keys for fmnist-cryptonets" in err and "uploading evaluation keys: " \
            "started" in err and "encrypted inference: done, 3 img" in err, err
        # a batch when asked, and a colour image converted when asked
        out = _cli(tmp_path, srv.url, str(tmp_path / "three.npy"), str(tmp_path / "colour.png"),
                   "--batch", "--normalized", "--grey")
        assert out.returncode == 0, out.stderr
        rows = [line.split()[0] for line in out.stdout.splitlines()[:-1]]
        assert rows == [f"{tmp_path / 'three.npy'}[{k}]" for k in range(3)] + [
            str(tmp_path / "colour.png")], out.stdout
        assert "(reused)" in out.stdout and "loading keys" in out.stderr
        out = _cli(tmp_path, srv.url, str(tmp_path / "boot.png"), "--json")
        assert json.loads(out.stdout)["predictions"][0]["label_name"] == want
        assert out.stderr == ""  # --json: no progress
        # the SDK reads files by the same rules (keys and session reused from the CLI's store)
        with Client(srv.url, ALICE, keystore=tmp_path / "ks") as c:
            m = c.model("fmnist-cryptonets")
            s = m.session()
            assert s.key_upload_bytes == 0
            assert s.predict(m.load(tmp_path / "boot.jpg")[0]).label_name == want
            with pytest.raises(InputError, match="--grey"):
                m.load(tmp_path / "colour.png")
            assert len(s.predict_batch(m.load(tmp_path / "three.npy", batch=True),
                                       normalized=True)) == 3
