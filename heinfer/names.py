"""Model names the server accepts, shared by the compiler (which names plans) and the server
(which serves them): lowercase letters, digits, '.', '_' and '-', starting with a letter or
digit, at most 64 characters (safe in URLs and as a directory name)."""

from __future__ import annotations

import re

MODEL_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


def is_model_name(name: str) -> bool:
    return bool(MODEL_NAME_RE.match(name))


def to_model_name(name: str) -> str:
    """The nearest accepted name: lowercased, other characters runs made '-', leading
    punctuation dropped, cut to 64 characters; '' when nothing usable is left."""
    out = re.sub(r"[^a-z0-9._-]+", "-", name.strip().lower())
    return out.lstrip("._-")[:64]
