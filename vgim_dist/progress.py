"""Progress of long commands (data prepare, probes, decoders, reports): a tqdm bar on a terminal, a plain
line per item in a log file (a redirected bar would be one long line of carriage returns)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def progress(items: Iterable[T], desc: str, total: int | None = None, unit: str = "it",
             note: Callable[[T], str] | None = None) -> Iterator[T]:
    """``items``, with a bar on stderr when it is a terminal, else ``desc: k/n unit`` after each item.
    ``note(item)`` says what the item did: the bar's suffix on a terminal, the end of the line in a log."""
    total = total if total is not None else (len(items) if hasattr(items, "__len__") else None)
    if sys.stderr.isatty():
        from tqdm import tqdm  # noqa: PLC0415

        with tqdm(items, desc=desc, total=total, unit=unit, leave=False, dynamic_ncols=True) as bar:
            for item in bar:
                yield item
                if note is not None:
                    bar.set_postfix_str(note(item), refresh=False)
        return
    for k, item in enumerate(items, 1):
        yield item
        line = f"{desc}: {k}/{total if total is not None else '?'} {unit}"
        print(line + (f" - {note(item)}" if note is not None else ""), file=sys.stderr, flush=True)
