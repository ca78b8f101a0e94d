"""Progress of long commands (train, data prepare, encode, plan, probes, decoders, reports): a tqdm bar on a
terminal, a plain line per item in a log file (a redirected bar would be one long line of carriage returns),
each with the time elapsed and an ETA."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def eta(now: float, step: int, clock: tuple[float, int], total: int) -> str:
    """``0:42 elapsed, ETA 1:03``, the rate measured since ``clock`` = (time, step) the count started at."""
    if step <= clock[1]:
        return "0:00 elapsed"
    rate = (now - clock[0]) / (step - clock[1])
    return f"{_hms(now - clock[0])} elapsed, ETA {_hms(rate * (total - step))}"


def _hms(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def progress(items: Iterable[T], desc: str, total: int | None = None, unit: str = "it",
             note: Callable[[T], str] | None = None, every: int = 1) -> Iterator[T]:
    """``items``, with a bar on stderr when it is a terminal, else ``desc: k/n unit (0:12 elapsed, ETA 0:30)``
    after every ``every``-th item and the last. ``note(item)`` says what the item did: the bar's suffix on a
    terminal, the end of the line in a log."""
    total = total if total is not None else (len(items) if hasattr(items, "__len__") else None)
    if sys.stderr.isatty():
        from tqdm import tqdm  # noqa: PLC0415

        with tqdm(items, desc=desc, total=total, unit=unit, leave=False, dynamic_ncols=True) as bar:
            for item in bar:
                yield item
                if note is not None:
                    bar.set_postfix_str(note(item), refresh=False)
        return
    clock = (time.monotonic(), 0)
    for k, item in enumerate(items, 1):
        yield item
        if k % every and k != total:
            continue
        line = f"{desc}: {k}/{total if total is not None else '?'} {unit}"
        if total is not None:
            line += f" ({eta(time.monotonic(), k, clock, total)})"
        print(line + (f" - {note(item)}" if note is not None else ""), file=sys.stderr, flush=True)
