"""Progress output: a tqdm bar on a terminal; elsewhere (a log file, CI) one line when a stage
starts, a line every ``INTERVAL_S`` seconds while it runs, and one when it ends (or, used as a
context manager, where an exception stopped it).

Every long loop of the package reports through ``progress_bar``, so that ``irm-lens run > log``
writes a readable log instead of thousands of bar redraws.
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Any, Iterable, Iterator

from tqdm.auto import tqdm

INTERVAL_S = 60.0


def progress_bar(iterable: Iterable | None = None, desc: str = "", *, total: int | None = None,
                 unit: str = "it", disable: bool = False, initial: int = 0, **kwargs: Any):
    """A ``tqdm`` bar when stderr is a terminal, else a ``LineProgress`` (same methods)."""
    if disable or sys.stderr.isatty():
        return tqdm(iterable, desc=desc, total=total, unit=unit, disable=disable,
                    initial=initial, **kwargs)
    return LineProgress(iterable, desc=desc, total=total, unit=unit, initial=initial)


class LineProgress:
    """What a progress bar says, as whole lines on stderr: start, every ``INTERVAL_S``, end."""

    def __init__(self, iterable: Iterable | None = None, *, desc: str = "",
                 total: int | None = None, unit: str = "it", initial: int = 0):
        self.iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.desc, self.total, self.unit, self.n = desc or "working", total, unit, initial
        self.postfix = ""
        self.start = self.last = time.monotonic()
        self.closed = False
        self._write(f"started ({self._count()})")

    def _count(self) -> str:
        of = f"/{self.total}" if self.total is not None else ""
        return f"{self.n}{of} {self.unit}"

    def _write(self, what: str) -> None:
        extra = f"; {self.postfix}" if self.postfix else ""
        print(f"{self.desc}: {what}{extra}", file=sys.stderr, flush=True)

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= INTERVAL_S:
            self.last = now
            self._write(f"{self._count()}, {now - self.start:.0f} s")

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._write(f"done, {self._count()} in {time.monotonic() - self.start:.0f} s")

    def __iter__(self) -> Iterator:
        try:
            for item in self.iterable:
                yield item
                self.update()
        finally:
            self.close()

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, exc_type, *exc_info) -> None:
        if exc_type is not None and not self.closed:  # not done: where it stopped, and why
            self.closed = True
            self._write(f"stopped at {self._count()} after "
                        f"{time.monotonic() - self.start:.0f} s ({exc_type.__name__})")
        self.close()


@contextmanager
def quiet_library_bars() -> Iterator[None]:
    """Off a terminal, silence transformers' and huggingface_hub's own bars ("Loading weights")
    inside the block; on a terminal, leave them."""
    if sys.stderr.isatty():
        yield
        return
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()
