"""Command-line building blocks both CLIs share (`shardstream.cli`, `shardstream.server.cli`).

Every flag has an environment variable (SHARDSTREAM_<FLAG>) read as its default
(`env`), so a malformed one is a one-line usage error naming the variable when it
is used, never for --help. Flag types (`checked`, `int_in`, `size_in`, `TIMEOUT`,
`PATH`, `ON_OFF`) say what was wrong and what is accepted; `UsageParser` makes
every error one line (exit status 2), takes no abbreviated flags and shows defaults.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from shardstream._common.sizes import format_size, parse_size

__all__ = [
    "LOG_LEVEL",
    "LOG_LEVELS",
    "MIN_TIMEOUT",
    "ON_OFF",
    "PATH",
    "PORT",
    "SECONDS",
    "TEXT",
    "TIMEOUT",
    "EnvText",
    "HelpFormatter",
    "UsageParser",
    "add_version_arg",
    "checked",
    "env",
    "int_in",
    "package_version",
    "size_in",
]


class UsageParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line on stderr (exit status 2), that
    takes no abbreviated flags (`--max-mess` is an error, not `--max-message-bytes`) and
    shows each flag's default in --help. Subcommands' parsers are of the same class."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


class HelpFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to the help of every flag with a default worth showing (not
    None, False or ""), before its "[SHARDSTREAM_...]" variable; a default taken from the
    variable says so."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        positional_required = not action.option_strings and action.nargs not in ("?", "*")
        if (
            "%(default)" in text
            or default is None
            or default is False
            or default == ""
            or default is argparse.SUPPRESS
            or positional_required
        ):
            return text
        note = "(default: %(default)s)"
        if isinstance(default, EnvText):
            note = f"(default: %(default)s, from {default.variable})"
        head, bracket, variable = text.rpartition(" [SHARDSTREAM_")
        return f"{head} {note}{bracket}{variable}" if bracket else f"{text} {note}"


def package_version() -> str:
    """The installed shardstream's version (`--version`)."""
    try:
        return importlib.metadata.version("shardstream")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed: pip install -e .)"


def add_version_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--version",
        action="version",
        version=f"%(prog)s {package_version()}",
        help="print the installed version and exit",
    )


class EnvText(str):
    """A flag's default taken from SHARDSTREAM_<NAME>. argparse converts a string
    default with the flag's `type` only when the flag is not given, so a bad value is
    a usage error naming the variable then, never at import or for --help."""

    variable = ""


def env(name: str, default: str | None = None) -> str | None:
    """SHARDSTREAM_<name> as a flag default (converted and checked by the flag's type)."""
    value = os.environ.get(f"SHARDSTREAM_{name}")
    if value is None:
        return default
    text = EnvText(value)
    text.variable = f"SHARDSTREAM_{name}"
    return text


T = TypeVar("T")


def on_off(text: str) -> bool:
    value = text.strip().lower()
    if value in ("on", "1", "true", "yes"):
        return True
    if value in ("off", "0", "false", "no"):
        return False
    raise ValueError(text)


def checked(convert: Callable[[str], T], accepts: str) -> Callable[[str], T]:
    """A flag type: `convert` (ValueError if it refuses), with an error naming the
    flag's value or the variable it came from and what is accepted."""

    def parse(text: str) -> T:
        if text.strip():
            try:
                value = convert(str(text))
            except ValueError:
                pass
            else:
                if isinstance(text, EnvText) and type(value) is str:
                    # Still an EnvText: the caller can tell the variable from the flag.
                    from_env = EnvText(value)
                    from_env.variable = text.variable
                    return from_env  # type: ignore[return-value]  # T is str here
                return value
        if isinstance(text, EnvText):
            got = f"{text.variable} is set but empty" if not text else f"{text.variable}={text!r}"
        else:
            got = repr(str(text))
        raise argparse.ArgumentTypeError(f"{got}: expected {accepts}")

    return parse


def int_in(low: int, high: int | None = None) -> Callable[[str], int]:
    def convert(text: str) -> int:
        n = int(text)
        if n < low or (high is not None and n > high):
            raise ValueError(text)
        return n

    return checked(
        convert, f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
    )


def size_in(low: int, high: int | None = None) -> Callable[[str], int]:
    """A byte-size flag type: `16MiB`, `64KiB`, `4096` (see `parse_size`), at least `low`
    and at most `high` (if given)."""

    def convert(text: str) -> int:
        n = parse_size(text)
        if n < low or (high is not None and n > high):
            raise ValueError(text)
        return n

    bounds = f">= {format_size(low)}"
    if high is not None:
        bounds += f", at most {format_size(high)}"
    return checked(convert, f"a size {bounds} (bytes, or with a unit: 4096, 64KiB, 16MiB)")


def seconds(text: str) -> float:
    x = float(text)
    if not (math.isfinite(x) and x >= 0):
        raise ValueError(text)
    return x


# The shortest timeout: gRPC and the worker's timers count whole milliseconds, so a
# shorter one would be 0 ms (every call or read timing out at once).
MIN_TIMEOUT = 0.001


def timeout(text: str) -> float:
    x = float(text)
    if not MIN_TIMEOUT <= x < 1e6:  # also refuses NaN
        raise ValueError(text)
    return x


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
PORT = int_in(0, 65535)
TIMEOUT = checked(timeout, f"a number of seconds > 0, at least {MIN_TIMEOUT}, under 1e6")
SECONDS = checked(seconds, "a number of seconds >= 0")
TEXT = checked(str, "a non-empty value")
PATH = checked(Path, "a file name")
ON_OFF = checked(on_off, "on or off")
LOG_LEVEL = checked(lambda text: _log_level(text), f"one of {', '.join(LOG_LEVELS)}")


def _log_level(text: str) -> str:
    level = text.strip().upper()
    if level not in LOG_LEVELS:
        raise ValueError(text)
    return level
