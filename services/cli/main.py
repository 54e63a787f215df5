"""The ``tandem`` console script: a thin dispatcher over one module per subcommand.

Each subcommand module has ``register(subparsers)``, which adds its parser and sets
``handler`` (``args -> exit status``). Adding a subcommand is one line in COMMANDS.
Subcommand modules import heavy dependencies (torch, grpc) inside their handlers, so
``tandem --help`` and services that need neither start fast.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable

from services.cli import (
    bench,
    gateway,
    generate,
    keys,
    models,
    router,
    tls_ca,
    up,
    usage,
    worker,
)
from services.engine.errors import TandemError
from services.launcher.launched import die_with_launcher

Register = Callable[[argparse._SubParsersAction], None]

COMMANDS: tuple[Register, ...] = (
    up.register,
    generate.register,
    models.register,
    usage.register,
    bench.register,
    router.register,
    worker.register,
    gateway.register,
    keys.register,
    tls_ca.register,
)

EXIT_FAILED = 1
"""Something went wrong while running (a store down, a service that would not start, a
transfer that failed): the command was right, trying again later may work."""
EXIT_USAGE = 2
"""Bad flags or a bad request: argparse's convention, kept for errors found later too (a
TandemError that is a ValueError or LookupError: a value given was wrong or names nothing)."""
EXIT_INTERRUPTED = 130
"""128 + SIGINT, what a shell reports for Ctrl-C."""
EXIT_BROKEN_PIPE = 141
"""128 + SIGPIPE, what a shell reports when a reader closes the pipe early."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tandem",
        description="Tandem: disaggregated LLM serving. Each subcommand has its own --help.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for register in COMMANDS:
        register(subparsers)
    return parser


def _leaf_parser(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.ArgumentParser:
    """The deepest subcommand parser ``argv`` names (``tandem keys list`` → keys list's)."""
    for word in argv:
        actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not actions or word not in actions[0].choices:
            continue
        parser = actions[0].choices[word]
    return parser


def exit_status(error: TandemError) -> int:
    """EXIT_USAGE when what was given is wrong (fix the command), EXIT_FAILED when running
    it failed (scripts retry the one, not the other)."""
    return EXIT_USAGE if isinstance(error, (ValueError, LookupError)) else EXIT_FAILED


def main(argv: list[str] | None = None) -> int:
    """Run ``tandem`` with ``argv`` (default: sys.argv[1:]) and return the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    die_with_launcher()  # first: a launched service must not outlive its launcher
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        parser = build_parser()
        args, extra = parser.parse_known_args(argv)
        if extra:  # said by the subcommand's parser: its usage line, not tandem's
            _leaf_parser(parser, argv).error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as exc:
        # argparse exits after --help (0) and on usage errors (2); return the status
        # instead, so callers and tests get an int like every other outcome.
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    args.argv = argv  # recorded by commands that write results (the command line)
    try:
        return int(args.handler(args))
    except TandemError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exit_status(exc)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`tandem generate ... | head`): not an error worth a
        # traceback. Point stdout at /dev/null so the interpreter's final flush is quiet.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE


if __name__ == "__main__":
    sys.exit(main())
