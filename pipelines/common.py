"""What every stage's entry point does the same way: parse `--config F key=value ...`, turn a
user's mistake into one clear line and a non-zero exit."""

from __future__ import annotations

import argparse
import functools
import logging
import sys
from collections.abc import Callable

from mim.config import ConfigError
from mim.runtime import RunDirBusy

USER_ERRORS = (ConfigError, FileNotFoundError, NotADirectoryError, PermissionError, RunDirBusy, ValueError)
EXIT_USER_ERROR = 2


def config_parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", help="YAML config (a recipe from configs/ or your own)")
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. data.batch_size=32"
    )
    return parser


def reports_user_errors(prog: str) -> Callable:
    """Wraps a stage's main: a user's mistake prints `prog: error: ...` and exits 2."""

    def wrap(main: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(main)
        def wrapped(argv: list[str] | None = None) -> int:
            try:
                return main(argv)
            except USER_ERRORS as error:
                logging.getLogger(prog).debug("user error", exc_info=True)
                print(f"{prog}: error: {error}", file=sys.stderr)
                return EXIT_USER_ERROR

        return wrapped

    return wrap
