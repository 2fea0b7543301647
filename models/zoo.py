"""The model zoo shipped with heinfer: trained HE-friendly networks under models/zoo/NAME/."""

from __future__ import annotations

from pathlib import Path

from heinfer.errors import ModelFormatError
from heinfer_packing.modelfile import load_model

ZOO_DIR = Path(__file__).parent / "zoo"
DEFAULT_MODEL = "fmnist-cryptonets"


def names() -> list[str]:
    return sorted(p.name for p in ZOO_DIR.iterdir()
                  if (p / "model.json").exists() or (p / "conformal.json").exists())


def model_dir(name: str) -> Path:
    d = ZOO_DIR / name
    if not ((d / "model.json").exists() or (d / "conformal.json").exists()):
        raise ModelFormatError(f"no model {name!r} in the zoo (and no model.json there); "
                               f"available: {names()}")
    return d


def load(name: str = DEFAULT_MODEL):
    """A `Model` (project format) or, for conformal networks, a `ConformalNet`."""
    d = model_dir(name)
    if (d / "conformal.json").exists():
        from heinfer_packing.conformal import load_conformal

        net, doc = load_conformal(d)
        net.metadata.setdefault("name", doc["name"])
        net.metadata["labels"] = doc.get("labels", [])
        return net
    return load_model(d)
