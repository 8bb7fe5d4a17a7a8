"""What every command-line entry point shares: one-line errors with exit status 2, checked numbers.

``Parser`` prints argparse's errors as one line (no usage block); ``finite_float`` and
friends reject NaN, infinities and out-of-range values while parsing; ``run_cli`` turns
the errors a user can cause (bad files, bad flags, a busy or full disk) into one line
on stderr and exit status 2, leaving tracebacks to real bugs.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable

from pararnn_core.safe_folder import is_disk_full


class CLIError(Exception):
    """A user error of a command-line tool: printed as one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message):
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def positive_float(text: str) -> float:
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def fraction(text: str) -> float:
    """A number in [0, 1)."""
    value = finite_float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1), got {text!r}")
    return value


def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return value

    return parse


positive_int = _int_at_least(1)
non_negative_int = _int_at_least(0)


def one_line(message: str) -> str:
    """Multi-line messages (lists of problems) joined into one line."""
    lines = [line.strip().removeprefix("- ") for line in str(message).splitlines()]
    return "; ".join(line for line in lines if line)


#: errors a user can cause with files and flags; anything else is a bug and keeps its traceback
USER_ERRORS = (CLIError, ValueError, OSError)


def run_cli(prog: str, body: Callable[[], int | None], disk_full_hint: str = "", interrupt_hint: str = "") -> int:
    """Run ``body``; a user error (bad flag or file, busy folder, full disk) becomes one line on
    stderr and exit status 2; Ctrl-C one line and status 130."""
    try:
        return body() or 0
    except USER_ERRORS as e:
        if is_disk_full(e):
            where = f" while writing {e.filename}" if e.filename else ""
            message = f"no space left on device{where}; {disk_full_hint}free space and run again"
        else:
            message = one_line(e)
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted{interrupt_hint}", file=sys.stderr)
        return 130
