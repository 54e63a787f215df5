"""argparse ``type=`` converters that reject bad values with a message naming the fix.

argparse turns an ArgumentTypeError into ``tandem <cmd>: error: argument --flag: <message>``
and exit status 2, so a bad flag never reaches the engine and never shows a traceback.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Callable
from pathlib import Path

_DEVICE = re.compile(r"cpu|cuda(:\d+)?")


def positive_int(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def positive_float(text: str) -> float:
    value = _float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number above 0, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = _float(text)
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number, 0 or more, got {text}")
    return value


def token_ids(text: str) -> list[int]:
    """``"1,2,3"`` → ``[1, 2, 3]``; range checks against the vocabulary happen in the engine."""
    parts = [p.strip() for p in text.split(",")]
    try:
        ids = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integer token ids such as 1,2,3, got {text!r}"
        ) from None
    return ids


def port(text: str) -> int:
    value = _int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port in [0, 65535], got {value}")
    return value


def host_port(text: str) -> str:
    """``HOST:PORT`` (``[v6]:PORT`` for an IPv6 address), returned as given. Without a port
    gRPC dials 443, and a worker retried an address like that forever."""
    host, sep, number = text.rpartition(":")
    if not sep or not host or host in ("[", "[]") or not number.isdigit():
        raise argparse.ArgumentTypeError(
            f"expected HOST:PORT, such as 127.0.0.1:50051 or [::1]:50051, got {text!r}"
        )
    if not 1 <= int(number) <= 65535:
        raise argparse.ArgumentTypeError(f"port must be in [1, 65535], got {number} in {text!r}")
    return text


def output_file(suffix: str = "") -> Callable[[str], Path]:
    """A converter for a file a command writes when it is done: checked now, so a long run
    never ends in a traceback over its output path: its name ends with ``suffix`` (when
    given; matplotlib wrote DIR.png for ``--plot DIR``), it is not a directory, and the
    nearest existing directory above it is writable (missing ones are made)."""

    def convert(text: str) -> Path:
        path = Path(text)
        if suffix and path.suffix.lower() != suffix:
            raise argparse.ArgumentTypeError(f"must be a {suffix} file name, got {text!r}")
        # Missing directories are made when the file is written: the nearest one that
        # exists must be a directory this user may write in.
        existing = next(p for p in (path.absolute(), *path.absolute().parents) if p.exists())
        if existing == path.absolute() and path.is_dir():
            raise argparse.ArgumentTypeError(f"{text!r} is a directory: name a file in it")
        if existing != path.absolute() and not (existing.is_dir() and os.access(existing, os.W_OK)):
            raise argparse.ArgumentTypeError(
                f"cannot write {text!r}: {existing} is not a directory this user may write in"
            )
        return path

    return convert


def device(text: str) -> str:
    if not _DEVICE.fullmatch(text):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    return text


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
