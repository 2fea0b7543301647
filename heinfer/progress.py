"""Progress for long work (compile, calibrate, keygen, key upload, batch predict), on stderr.

On a terminal: a tqdm bar. Piped or redirected (CI logs, `| tee`): plain lines, one when the
work starts, then at most one every `HEINFER_PROGRESS_INTERVAL` seconds (default 5) and one
when it ends, instead of a bar redrawn into one long line. `HEINFER_PROGRESS=0` turns both off.

    with Progress(len(xs), "encrypted inference", unit="img") as bar:
        for x in xs:
            ...; bar.update()
    with Phase("generating keys"):        # work of unknown length: a start and an end line
        ...
"""

from __future__ import annotations

import os
import sys
import time
from typing import IO, Any


def _interval() -> float:
    try:
        return max(0.0, float(os.environ.get("HEINFER_PROGRESS_INTERVAL", "5")))
    except ValueError:
        return 5.0


def enabled() -> bool:
    return os.environ.get("HEINFER_PROGRESS", "1").lower() not in ("0", "false", "no", "off")


def _is_tty(file: IO[str]) -> bool:
    try:
        return file.isatty()
    except (AttributeError, ValueError):
        return False


def _fmt_n(n: float, unit: str) -> str:
    if unit == "B":
        return f"{n / 1e6:.1f} MB"
    return f"{n:g} {unit}"


class Progress:
    """A counter of `total` units of work (None: unknown), shown as a bar or as lines."""

    def __init__(self, total: int | None, desc: str, *, unit: str = "it",
                 file: IO[str] | None = None, disable: bool = False):
        self.total, self.desc, self.unit = total, desc, unit
        self.file = file or sys.stderr
        self.n = 0
        self.t0 = self.last = time.monotonic()
        self.disabled = disable or not enabled()
        self.closed = False
        self._bar: Any = None
        if self.disabled:
            return
        if _is_tty(self.file):
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, file=self.file,
                             unit_scale=unit == "B", unit_divisor=1000, leave=True)
        else:
            self._line(f"{self.desc}: started" + (f", {_fmt_n(total, unit)} to do"
                                                   if total else ""))

    def _line(self, text: str) -> None:
        print(text, file=self.file, flush=True)

    def _status(self) -> str:
        elapsed = time.monotonic() - self.t0
        if self.total:
            left = (elapsed / self.n * (self.total - self.n)) if self.n else None
            return (f"{self.desc}: {_fmt_n(self.n, self.unit)} of {_fmt_n(self.total, self.unit)}"
                    f" ({100 * self.n / self.total:.0f}%), {elapsed:.1f} s"
                    + (f", ~{left:.0f} s left" if left is not None and self.n < self.total
                       else ""))
        return f"{self.desc}: {_fmt_n(self.n, self.unit)}, {elapsed:.1f} s"

    def update(self, n: float = 1) -> None:
        self.n += n
        if self.disabled or self.closed:
            return
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.monotonic()
        if now - self.last >= _interval() and not (self.total and self.n >= self.total):
            self.last = now
            self._line(self._status())

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.disabled:
            return
        if self._bar is not None:
            self._bar.close()
        else:
            elapsed = time.monotonic() - self.t0
            self._line(f"{self.desc}: done, {_fmt_n(self.n, self.unit)} in {elapsed:.1f} s")

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Phase:
    """A step with no measurable fraction (one SEAL call): a line at the start, the time at
    the end (on a terminal, the same line completed)."""

    def __init__(self, desc: str, *, file: IO[str] | None = None, disable: bool = False):
        self.desc = desc
        self.file = file or sys.stderr
        self.disabled = disable or not enabled()
        self.tty = _is_tty(self.file)
        self.t0 = time.monotonic()

    def __enter__(self) -> Phase:
        if not self.disabled:
            print(f"{self.desc} ...", end="" if self.tty else "\n", file=self.file, flush=True)
        self.t0 = time.monotonic()
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if self.disabled:
            return
        took = f"{time.monotonic() - self.t0:.1f} s"
        state = "failed" if exc_type is not None else "done"
        print(f" {state} ({took})" if self.tty else f"{self.desc}: {state} in {took}",
              file=self.file, flush=True)
