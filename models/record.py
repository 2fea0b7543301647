"""Record a zoo model's encrypted accuracy on real test images next to its weights.

    .venv/bin/python -m heinfer_models.record fmnist-cryptonets --images 500

Writes models/zoo/NAME/encrypted_eval.json: images, encrypted accuracy, top-1 agreement with the
plaintext model, max logit error, parameters, layout and timings (timings are indicative only;
benchmarks live in bench/).
"""

from __future__ import annotations

import argparse
import json
import time

from heinfer_models import fashion_mnist, zoo
from heinfer_models.evaluate import add_plan_options, evaluate_encrypted


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name", choices=zoo.names())
    ap.add_argument("--images", type=int, default=500)
    add_plan_options(ap)
    args = ap.parse_args(argv)
    model = zoo.load(args.name)
    images, labels = fashion_mnist.load("test")
    xs = fashion_mnist.normalize(images[: args.images], model.input_shape)
    res = evaluate_encrypted(model, xs, first_conv=args.first_conv, precise=args.precise)
    summary = res.summary(labels[: args.images])
    record = {
        "command": f"python -m heinfer_models.record {args.name} --images {args.images} "
                   f"--first-conv {args.first_conv}" + (" --precise" if args.precise else ""),
        "date": time.strftime("%Y-%m-%d"),
        "test_images": f"first {args.images} of the Fashion-MNIST test set",
        "plaintext_accuracy_same_images": float(
            (res.plain_predictions == labels[: args.images]).mean()),
        **summary,
    }
    mode = args.first_conv + ("_precise" if args.precise else "")
    out = zoo.model_dir(args.name) / f"encrypted_eval_{mode}.json"
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record, indent=1))
    ok = summary["agreement"] >= 0.995
    print(f"\nagreement {summary['agreement']:.2%} ({'meets' if ok else 'MISSES'} the 99.5% bar); "
          f"wrote {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
