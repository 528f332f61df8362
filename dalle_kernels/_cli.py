"""The argument parser of the package's command-line tools (and of ``dalle``'s): usage errors in one line."""
from __future__ import annotations

import argparse
import os


class Parser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose usage errors are one line on stderr, exit status 2, no traceback:
    ``PROG: error: MESSAGE (see PROG --help)``; under torchrun only rank 0 prints it (every rank exits 2)."""

    def error(self, message):
        # under torchrun every process parses the same command line: the first one says what is wrong
        if os.environ.get("RANK", "0") != "0":
            self.exit(2)
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def int_at_least(low: int):
    """argparse type: an integer ``>= low``."""
    def check(text):
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}")
        return v
    check.__name__ = f"int >= {low}"
    return check


positive_int = int_at_least(1)
