"""What every command line of the project shares: the help formatter, argument types, exit codes.

Each component defines its commands' arguments once (``add_arguments(parser)`` + ``run(args)``);
``her2low`` composes them, and ``python -m dicom_node`` / ``python -m cds_service`` reuse the same
functions, so an option exists in one place only. Errors are one line on stderr, never a traceback:
exit 2 for bad usage, 1 for a failure, 3 for a database that needs ``her2low db upgrade``.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, NoReturn

if TYPE_CHECKING:
    from her2low.core.settings import Settings

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_NOT_MIGRATED = 3
EXIT_INTERRUPTED = 130


class HelpFormatter(argparse.HelpFormatter):
    """Descriptions wrapped paragraph by paragraph; every option's default shown (unless None or
    a bare flag)."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        paragraphs = [p for p in text.split("\n\n") if p.strip()]
        return "\n\n".join(
            super(HelpFormatter, self)._fill_text(p, width, indent) for p in paragraphs
        )

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            "%(default)" in text
            or default is None
            or default is False
            or default is argparse.SUPPRESS
            or not (action.option_strings or action.nargs in (argparse.OPTIONAL, "*"))
        ):
            return text
        return f"{text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line (``prog: error: ...``), exit 2."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {one_line(message)} (see --help)\n")


def one_line(text: object) -> str:
    """An exception or message folded onto one line (multi-line errors break log scrapers)."""
    return " ".join(str(text).split())


def fail(prog: str, message: object, code: int = EXIT_FAILURE) -> int:
    """Print ``prog: error: message`` on stderr and return ``code`` (for ``return fail(...)``)."""
    print(f"{prog}: error: {one_line(message)}", file=sys.stderr)
    return code


def positive_int(text: str) -> int:
    """argparse type: an integer ≥ 1 (``--jobs 0`` would mean no worker at all)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be 1 or more")
    return value


def positive_float(text: str) -> float:
    """argparse type: a number > 0, ``inf`` allowed (``math.inf`` is accepted as a spelling)."""
    cleaned = text.strip().lower().removeprefix("math.").removeprefix("+")
    try:
        value = float(cleaned)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number (or 'inf')") from None
    if math.isnan(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text} must be positive (or 'inf')")
    return value


def configured_settings() -> Settings:
    """The settings, with logging configured from them (what every long-running command needs)."""
    from her2low.core import logs
    from her2low.core.settings import load_settings

    settings = load_settings()
    logs.configure(settings.log_level, settings.log_format)
    return settings


def _raised(exc: BaseException, module: str, name: str) -> bool:
    """``isinstance(exc, module.name)`` without importing ``module`` (settings pull in pydantic,
    the database module Alembic): an exception of a module never imported was never raised."""
    loaded = sys.modules.get(module)
    return loaded is not None and isinstance(exc, getattr(loaded, name))


def run_guarded(
    prog: str, func: Callable[[argparse.Namespace], int], args: argparse.Namespace
) -> int:
    """Run a command, turning the errors a user can cause into one line and an exit code.

    The specific cases are handled where they arise; this is the backstop so that a missed
    ``OSError`` (a full disk, a path under a file) or ``ValueError`` still reads as one line.
    """
    try:
        return int(func(args))
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception as exc:
        if _raised(exc, "her2low.core.settings", "ConfigurationError"):
            return fail(prog, f"configuration: {exc}", EXIT_USAGE)
        if _raised(exc, "her2low.core.database", "NotMigratedError"):
            return fail(prog, exc, EXIT_NOT_MIGRATED)
        if isinstance(exc, (OSError, ValueError)):
            what = type(exc).__name__ if isinstance(exc, OSError) and not str(exc) else exc
            return fail(prog, what, EXIT_FAILURE)
        raise
