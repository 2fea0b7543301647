"""An uploaded plan file pair read strictly before `Plan.load`: any defect is `invalid_plan`.

`Plan.load` trusts its files (they come from `Plan.save`); an admin upload is bytes from the
network. Here: the JSON must be UTF-8 and hold only finite numbers (Python's json reads NaN and
Infinity, which would silently poison every prediction), the .npz must be a zip of plain numpy
arrays (no pickles) with finite values, and whatever `Plan.load` still raises becomes one
`invalid_plan` line. Messages name the part (`plan_json`, `plan_npz`), never a server path.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np

from heinfer.errors import HeinferError
from heinfer_server.errors import ApiError


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number a plan may hold")


def check_json(path: Path) -> None:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError("invalid_plan", f"plan_json is not UTF-8 (byte {e.start})") from None
    try:
        json.loads(text, parse_constant=_no_constant)
    except ValueError as e:  # JSONDecodeError is a ValueError
        raise ApiError("invalid_plan", f"plan_json is not valid JSON: {e}") from None


def check_npz(path: Path) -> None:
    try:
        with np.load(path, allow_pickle=False) as npz:
            for key in npz.files:
                a = npz[key]
                if a.dtype.kind not in "biuf":
                    raise ApiError("invalid_plan", f"plan_npz array {key!r} has dtype "
                                   f"{a.dtype}; plans hold numbers only")
                if a.dtype.kind == "f" and not np.isfinite(a).all():
                    raise ApiError("invalid_plan", f"plan_npz array {key!r} holds NaN or "
                                   "Infinity")
    except ApiError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as e:
        raise ApiError("invalid_plan", f"plan_npz is not a numpy .npz of arrays "
                       f"({type(e).__name__})") from None


def load_checked(json_path: str | Path):
    """Plan.load after the strict checks; any failure is an ApiError naming no server path."""
    from heinfer.plan import Plan

    p = Path(json_path)
    check_json(p)
    check_npz(Path(str(p).removesuffix(".json") + ".npz"))
    try:
        return Plan.load(p)
    except ApiError:
        raise
    except HeinferError as e:  # keeps its own code (plan_version, insecure_params, ...)
        raise type(e)(str(e).replace(str(p.parent) + "/", "")) from None
    except Exception as e:  # a well-formed file that is not a plan: missing keys, bad types
        raise ApiError("invalid_plan", f"plan_json does not describe a heinfer plan "
                       f"({type(e).__name__}: {str(e)[:200]})") from None
