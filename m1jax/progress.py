"""Progress for the command line: tqdm bars with an ETA, and one-line status messages, all on stderr.

A bar draws only when stderr is a terminal and the run is not quiet: redirected logs and tests get no carriage
returns or escape codes. Where no bar draws, `plain_every` (when set) prints a plain line every that many units
instead, so a log still shows how a long run goes. Status messages ("resuming from step N of OUT",
"compiling ...") print unless quiet.

    with progress_bar(total=steps, initial=start, desc="train", unit="step") as bar:
        for step in range(start, steps):
            ...
            bar.update(1, loss=f"{loss:.4f}")
"""
from __future__ import annotations

import sys
import time
from typing import Any, TextIO


def stderr_is_terminal(stream: TextIO | None = None) -> bool:
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # a closed or fake stream
        return False


def status(message: str, *, quiet: bool = False, stream: TextIO | None = None) -> None:
    """One line on stderr (unless quiet): what the program is doing now."""
    if not quiet:
        print(message, file=sys.stderr if stream is None else stream, flush=True)


class ProgressBar:
    """A tqdm bar over `total` units starting at `initial` (a resumed run), or nothing where it cannot draw.

    update(n, **postfix) advances by n units and shows postfix as "key=value" after the bar. With plain_every
    set and no bar, a line "desc n/total key=value ... eta Xs" every plain_every units and at the end.
    """

    def __init__(self, total: int, *, desc: str, unit: str = "it", initial: int = 0, quiet: bool = False,
                 plain_every: int | None = None, stream: TextIO | None = None):
        if isinstance(total, bool) or not isinstance(total, int) or total < 0:
            raise ValueError(f"total={total!r}: pass an integer >= 0")
        if isinstance(initial, bool) or not isinstance(initial, int) or not 0 <= initial <= total:
            raise ValueError(f"initial={initial!r}: pass an integer in [0, total={total}]")
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.stream = sys.stderr if stream is None else stream
        self._bar = None
        self._plain_every = None
        if not quiet and stderr_is_terminal(self.stream):
            from tqdm import tqdm
            self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=self.stream,
                             dynamic_ncols=True, leave=True)
        elif not quiet and plain_every:
            self._plain_every = max(int(plain_every), 1)
        self._start_n, self._start_time, self.quiet = initial, None, quiet

    @property
    def drawing(self) -> bool:
        """True when a tqdm bar is on the terminal."""
        return self._bar is not None

    def update(self, n: int = 1, **postfix: Any) -> None:
        if self._start_time is None:
            self._start_time = time.perf_counter()
        self.n += n
        if self._bar is not None:
            if postfix:
                self._bar.set_postfix(postfix, refresh=False)
            self._bar.update(n)
        elif self._plain_every and (self.n % self._plain_every == 0 or self.n == self.total):
            done = self.n - self._start_n
            rate = (time.perf_counter() - self._start_time) / done if done > 0 else 0.0
            fields = "".join(f" {k} {v}" for k, v in postfix.items())
            print(f"{self.desc} {self.n}/{self.total}{fields} eta {rate * (self.total - self.n):,.0f}s",
                  file=self.stream, flush=True)

    def write(self, message: str) -> None:
        """A line above the bar (or plainly where no bar draws); nothing when quiet."""
        if self.quiet:
            return
        if self._bar is not None:
            self._bar.write(message, file=self.stream)
        else:
            print(message, file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "ProgressBar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress_bar(total: int, *, desc: str, unit: str = "it", initial: int = 0, quiet: bool = False,
                 plain_every: int | None = None, stream: TextIO | None = None) -> ProgressBar:
    """A `ProgressBar` (see its docstring); use it as a context manager so the bar always closes."""
    return ProgressBar(total, desc=desc, unit=unit, initial=initial, quiet=quiet, plain_every=plain_every,
                       stream=stream)
