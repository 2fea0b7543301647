"""Baseline for the first benchmark: TenSEAL's own encrypted-CNN tutorial, unchanged.

This reproduces "Tutorial 4 - Encrypted Convolution on MNIST" from the TenSEAL repository
(OpenMined/TenSEAL, ``tutorials/Tutorial 4 - Encrypted Convolution on MNIST.ipynb``) call for
call: the same ``EncConvNet`` (``conv2d_im2col`` per kernel + bias, ``CKKSVector.pack_vectors``,
``square_``, ``mm`` + bias, ``square_``, ``mm`` + bias), the same client encoding
(``ts.im2col_encoding(context, image, kernel_shape[0], kernel_shape[1], stride)``) and the same
context (CKKS, ``poly_modulus_degree=8192``, ``coeff_mod_bit_sizes=[31, 26 x 6, 31]``,
``global_scale = 2**26``, ``generate_galois_keys()``).

The only change is where the weights come from: the tutorial reads them from a trained PyTorch
``ConvNet``; here they are read from a heinfer model directory of the same architecture
(conv 4x1x7x7 stride 3 -> x^2 -> flatten -> dense 256->64 -> x^2 -> dense 64->10), converted
exactly as the tutorial converts them (conv kernels viewed as (out_channels, kh, kw), dense
weights transposed because TenSEAL's ``mm`` computes ``x @ W``).

The tutorial is reproduced with its flaws, which show up in ``max_logit_error``:

* ``mm(fc1_weight) + fc1_bias`` adds the bias to slots 0..63 only, while ``mm`` leaves its result
  replicated over all 4096 slots and the next ``mm`` (diagonal method) reads slots 64..72 for
  logits 1..9. Those logits therefore see fc1 outputs without their bias; logit 0 is exact.
  (Checked with 40-bit primes: error ~1e-5 on logit 0, or on all logits with fc1 bias zeroed;
  up to 8e-2 on logits 1..9 with an N(0, 0.1) fc1 bias.)
* 26-bit scale/primes give a CKKS noise floor around 1e-2..1e-1 on the logits once the two
  squarings amplify it, more for inputs normalized to [-0.8, 2] than for the tutorial's [0, 1].

Run ``python bench/tenseal_tutorial.py [-k 5] [--model-dir DIR]`` for a table at TenSEAL's
default thread count and at one thread.
"""

from __future__ import annotations

import argparse
import multiprocessing
import time
from pathlib import Path
from typing import Any

import numpy as np
import tenseal as ts

from heinfer.errors import ModelFormatError
from heinfer_packing.modelfile import Model, load_model

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL_DIR = REPO_ROOT / "models" / "zoo" / "fmnist-tenseal-tutorial"

# The tutorial's architecture, as heinfer ops (the square activation is poly [0, 0, 1]).
_EXPECTED_OPS = ["conv2d", "poly", "flatten", "dense", "poly", "dense"]
_SQUARE = [0.0, 0.0, 1.0]


def _check_structure(model: Model) -> None:
    """Refuse any model EncConvNet would silently mis-evaluate."""
    ops = [layer.op for layer in model.layers]
    if ops != _EXPECTED_OPS:
        raise ModelFormatError(f"{model.name}: expected layers {_EXPECTED_OPS}, got {ops}")
    conv, act1, _, fc1, act2, fc2 = model.layers
    if conv.weight is None or conv.weight.shape[1] != 1 or conv.attrs.get("padding", 0) != 0:
        raise ModelFormatError(f"{model.name}: the tutorial's conv has 1 input channel, no padding")
    if conv.bias is None or fc1.bias is None or fc2.bias is None:
        raise ModelFormatError(f"{model.name}: the tutorial's conv and dense layers have biases")
    for act in (act1, act2):
        if [float(c) for c in act.attrs["coeffs"]] != _SQUARE:
            raise ModelFormatError(f"{model.name}: {act.name} is not the square activation x^2")
    if tuple(model.input_shape) != (1, 28, 28):
        raise ModelFormatError(f"{model.name}: input shape {model.input_shape} is not (1, 28, 28)")


class EncConvNet:
    """The tutorial's ``EncConvNet``, built from a heinfer ``Model`` instead of a torch module.

    ``forward`` is the tutorial's, line for line.
    """

    def __init__(self, model: Model) -> None:
        _check_structure(model)
        conv1, _, _, fc1, _, fc2 = model.layers
        out_channels, _, kh, kw = conv1.weight.shape
        # torch: conv1.weight.data.view(out_channels, kernel_size[0], kernel_size[1]).tolist()
        self.conv1_weight = conv1.weight.reshape(out_channels, kh, kw).tolist()
        self.conv1_bias = conv1.bias.tolist()

        # torch: fc1.weight.T.data.tolist() -- TenSEAL's mm computes x @ W, so W is (in, out)
        self.fc1_weight = fc1.weight.T.tolist()
        self.fc1_bias = fc1.bias.tolist()

        self.fc2_weight = fc2.weight.T.tolist()
        self.fc2_bias = fc2.bias.tolist()

        # required for encoding (torch: model.conv1.kernel_size, model.conv1.stride[0])
        self.kernel_shape = (kh, kw)
        self.stride = int(conv1.attrs.get("stride", 1))

    def forward(self, enc_x: ts.CKKSVector, windows_nb: int) -> ts.CKKSVector:
        # conv layer
        enc_channels = []
        for kernel, bias in zip(self.conv1_weight, self.conv1_bias, strict=True):
            y = enc_x.conv2d_im2col(kernel, windows_nb) + bias
            enc_channels.append(y)
        # pack all channels into a single flattened vector
        enc_x = ts.CKKSVector.pack_vectors(enc_channels)
        # square activation
        enc_x.square_()
        # fc1 layer
        enc_x = enc_x.mm(self.fc1_weight) + self.fc1_bias
        # square activation
        enc_x.square_()
        # fc2 layer
        enc_x = enc_x.mm(self.fc2_weight) + self.fc2_bias
        return enc_x

    def __call__(self, *args: Any, **kwargs: Any) -> ts.CKKSVector:
        return self.forward(*args, **kwargs)


def make_context(n_threads: int | None = None) -> ts.Context:
    """The tutorial's "Encryption Parameters" cell; ``n_threads`` None = TenSEAL's default."""
    # controls precision of the fractional part
    bits_scale = 26

    extra: dict[str, int] = {} if n_threads is None else {"n_threads": n_threads}
    # Create TenSEAL context
    context = ts.context(
        ts.SCHEME_TYPE.CKKS,
        poly_modulus_degree=8192,
        coeff_mod_bit_sizes=[31, bits_scale, bits_scale, bits_scale, bits_scale, bits_scale,
                             bits_scale, 31],
        **extra,
    )

    # set the scale
    context.global_scale = pow(2, bits_scale)

    # galois keys are required to do ciphertext rotations
    context.generate_galois_keys()
    return context


def run_tutorial(model_dir: str | Path, images: np.ndarray, n_threads: int | None) -> dict:
    """Run the tutorial's encrypted inference on ``images`` (N, 1, 28, 28), normalized float64.

    Per image: the client encodes and encrypts (``im2col_encoding``), the encrypted input is
    serialized to count upload bytes, the server evaluates ``EncConvNet`` (the only thing in
    ``server_s``), the client decrypts. Decrypted logits are compared with the numpy oracle
    ``Model.forward``.

    Returns per-image means of ``server_s``, ``client_encrypt_s``, ``client_decrypt_s``,
    ``upload_bytes`` and ``agreement`` (top-1 match with the oracle); ``max_logit_error`` is the
    largest |HE - oracle| logit over all images (``mean_max_logit_error`` its per-image mean);
    ``eval_key_bytes`` is the public context the client must ship for the server to evaluate
    (public key + Galois keys + relinearization keys, no secret key; SEAL's default compression);
    ``eval_key_bytes_without_public_key`` the same without the public key, which evaluation does
    not use. ``n_threads`` is as requested (None = TenSEAL default), ``threads_effective`` what
    TenSEAL then uses.
    """
    images = np.asarray(images, dtype=np.float64)
    if images.ndim != 4 or images.shape[1:] != (1, 28, 28):
        raise ValueError(f"images must be (N, 1, 28, 28), got {images.shape}")
    model = load_model(model_dir)
    enc_model = EncConvNet(model)
    kernel_shape, stride = enc_model.kernel_shape, enc_model.stride

    context = make_context(n_threads)
    eval_key_bytes = len(context.serialize(save_public_key=True, save_secret_key=False,
                                           save_galois_keys=True, save_relin_keys=True))
    eval_key_bytes_no_pk = len(context.serialize(save_public_key=False, save_secret_key=False,
                                                 save_galois_keys=True, save_relin_keys=True))

    server_s, encrypt_s, decrypt_s, upload, errors, agree = [], [], [], [], [], []
    for img in images:
        # Encoding and encryption (client)
        t0 = time.perf_counter()
        x_enc, windows_nb = ts.im2col_encoding(
            context, img.reshape(28, 28).tolist(), kernel_shape[0], kernel_shape[1], stride
        )
        t1 = time.perf_counter()
        upload.append(len(x_enc.serialize()))

        # Encrypted evaluation (server)
        t2 = time.perf_counter()
        enc_output = enc_model(x_enc, windows_nb)
        t3 = time.perf_counter()

        # Decryption of result (client)
        output = np.asarray(enc_output.decrypt())
        t4 = time.perf_counter()

        encrypt_s.append(t1 - t0)
        server_s.append(t3 - t2)
        decrypt_s.append(t4 - t3)
        expected = model.forward(img)
        errors.append(float(np.max(np.abs(output - expected))))
        agree.append(float(np.argmax(output) == np.argmax(expected)))

    return {
        "server_s": float(np.mean(server_s)),
        "client_encrypt_s": float(np.mean(encrypt_s)),
        "client_decrypt_s": float(np.mean(decrypt_s)),
        "upload_bytes": float(np.mean(upload)),
        "eval_key_bytes": eval_key_bytes,
        "eval_key_bytes_without_public_key": eval_key_bytes_no_pk,
        "max_logit_error": float(np.max(errors)),
        "mean_max_logit_error": float(np.mean(errors)),
        "agreement": float(np.mean(agree)),
        "n_images": len(images),
        "n_threads": n_threads,
        "threads_effective": n_threads if n_threads is not None else multiprocessing.cpu_count(),
    }


def _print_table(rows: list[dict]) -> None:
    cols = [
        ("threads", lambda r: f"{'default' if r['n_threads'] is None else r['n_threads']}"
                              f" ({r['threads_effective']})"),
        ("server s", lambda r: f"{r['server_s']:.3f}"),
        ("encrypt s", lambda r: f"{r['client_encrypt_s']:.3f}"),
        ("decrypt s", lambda r: f"{r['client_decrypt_s']:.4f}"),
        ("upload KB", lambda r: f"{r['upload_bytes'] / 1e3:.1f}"),
        ("eval keys MB", lambda r: f"{r['eval_key_bytes'] / 1e6:.2f}"),
        ("max |err|", lambda r: f"{r['max_logit_error']:.2e}"),
        ("top-1 agree", lambda r: f"{r['agreement']:.2f}"),
        ("images", lambda r: str(r["n_images"])),
    ]
    cells = [[name for name, _ in cols]] + [[fmt(r) for _, fmt in cols] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    for i, row in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def main(argv: list[str] | None = None) -> None:
    from heinfer_models import fashion_mnist

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-k", type=int, default=5, help="first K Fashion-MNIST test images")
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    args = parser.parse_args(argv)

    raw, _ = fashion_mnist.load("test")
    images = fashion_mnist.normalize(raw[: args.k])
    print(f"TenSEAL Tutorial 4 baseline, model {args.model_dir}, {args.k} images")
    _print_table([run_tutorial(args.model_dir, images, n) for n in (None, 1)])


if __name__ == "__main__":
    main()
