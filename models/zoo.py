"""The model zoo shipped with heinfer: trained HE-friendly networks under models/zoo/NAME/."""

from __future__ import annotations

from pathlib import Path

from heinfer.errors import ModelFormatError
from heinfer_packing.modelfile import Model, load_model

ZOO_DIR = Path(__file__).parent / "zoo"
DEFAULT_MODEL = "fmnist-cryptonets"


def names() -> list[str]:
    return sorted(p.name for p in ZOO_DIR.iterdir() if (p / "model.json").exists())


def model_dir(name: str) -> Path:
    d = ZOO_DIR / name
    if not (d / "model.json").exists():
        raise ModelFormatError(f"no model {name!r} in the zoo (and no model.json there); "
                               f"available: {names()}")
    return d


def load(name: str = DEFAULT_MODEL) -> Model:
    return load_model(model_dir(name))
