"""``tandem tls-dev-ca``: a development CA and one certificate per service, as PEM files.

For stacks started by other tools (deploy/compose.tls.yaml runs it in a one-shot
container); ``tandem up --tls`` mints its own. Production certificates come from the
organisation's CA or cert-manager: this CA's key sits beside the certificates it signs.
"""

from __future__ import annotations

import argparse
import datetime
import os
from pathlib import Path

from services.cli import arg_types
from services.engine.errors import InvalidRequestError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "tls-dev-ca",
        help="mint a development CA and a certificate per service name (PEM files)",
        description="Write DIR/ca.pem (the --tls-ca every service and client trusts), "
        "DIR/ca-key.pem and, per NAME, DIR/NAME.pem + DIR/NAME-key.pem: a P-256 leaf for "
        "server and client use whose names are NAME, localhost, 127.0.0.1 and ::1. Keys "
        "are 0600. An existing CA in DIR is kept, and so are leaves already there, unless "
        "--renew: run it again to add names.",
    )
    p.add_argument("names", nargs="+", metavar="NAME", help="service host names to certify")
    p.add_argument("--dir", type=Path, required=True, help="where the files go (created)")
    p.add_argument(
        "--days",
        type=arg_types.positive_int,
        default=30,
        help="validity of a new CA and its leaves, in days (default 30)",
    )
    p.add_argument(
        "--renew", action="store_true", help="replace the CA and every leaf named (new keys)"
    )
    p.add_argument(
        "--owner",
        action="append",
        default=[],
        metavar="[NAME=]UID",
        help="chown the leaves' files to UID (NAME=UID: that leaf's only), for containers "
        "running as other users; needs root. Repeatable. Default: the caller owns them",
    )
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from services.rpc.tls_dev_ca import DevCa

    owners = _owners(args.owner, args.names)
    validity = datetime.timedelta(days=args.days)
    ca = DevCa(args.dir)
    if args.renew or not (ca.cert.exists() and ca.key.exists()):
        ca = DevCa.create(args.dir, validity)
        print(f"new CA {ca.cert}")
    for name in args.names:
        cert, key = args.dir / f"{name}.pem", args.dir / f"{name}-key.pem"
        if args.renew or not (cert.exists() and key.exists()):
            ca.issue(name, validity=validity)
            print(f"issued {cert}")
        else:
            print(f"kept {cert}")
        if (uid := owners.get(name)) is not None:
            _chown(uid, cert, key)
    if owners:
        args.dir.chmod(0o755)  # others enter; every key stays 0600 to its owner
        ca.cert.chmod(0o644)
    return 0


def _chown(uid: int, *paths: Path) -> None:
    try:
        for path in paths:
            os.chown(path, uid, -1)
    except PermissionError:
        raise InvalidRequestError(
            "--owner", f"changing the owner of {paths[0]} needs root: run as root or drop --owner"
        ) from None


def _owners(values: list[str], names: list[str]) -> dict[str, int]:
    """Leaf name -> uid from ``[NAME=]UID`` values: a bare UID for every leaf, NAME=UID
    for that leaf whatever the order."""
    default: int | None = None
    specific: dict[str, int] = {}
    for value in values:
        name, _, uid = value.rpartition("=")
        if not uid.isdigit():
            raise InvalidRequestError("--owner", f"{value!r}: give UID or NAME=UID, UID a number")
        if name and name not in names:
            raise InvalidRequestError("--owner", f"{name!r} is not one of the names given")
        if name:
            specific[name] = int(uid)
        else:
            default = int(uid)
    owners = {name: specific.get(name, default) for name in names}
    return {name: uid for name, uid in owners.items() if uid is not None}
