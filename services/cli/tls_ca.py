"""``tandem tls-dev-ca``: a development CA and one certificate per service, as PEM files.

For stacks started by other tools (deploy/compose.tls.yaml runs it in a one-shot
container); ``tandem up --tls`` mints its own. Production certificates come from the
organisation's CA or cert-manager: this CA's key sits beside the certificates it signs.

``--scraper NAME`` adds a second CA, the scrapers' (``scraper-ca.pem``), and a client-only
certificate per scraper from it: the services take it as ``--metrics-client-ca``, so
Prometheus's certificate opens their ``/metrics`` and none of their gRPC ports.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from services.cli import arg_types
from services.engine.errors import InvalidRequestError

if TYPE_CHECKING:
    from services.rpc.tls_dev_ca import DevCa

RESERVED = ("ca", "scraper-ca")
"""The CAs' file stems, services.rpc.tls_dev_ca's CLUSTER_CA and SCRAPER_CA (copied so that
--help imports no cryptography; a test keeps them equal): a leaf so named would overwrite
a CA."""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "tls-dev-ca",
        help="mint a development CA and a certificate per service name (PEM files)",
        description="Write DIR/ca.pem (the --tls-ca every service and client trusts), "
        "DIR/ca-key.pem and, per NAME, DIR/NAME.pem + DIR/NAME-key.pem: a P-256 leaf for "
        "server and client use whose names are NAME, localhost, 127.0.0.1 and ::1. With "
        "--scraper, also DIR/scraper-ca.pem (the services' --metrics-client-ca), "
        "DIR/scraper-ca-key.pem and, per scraper, DIR/SCRAPER.pem + DIR/SCRAPER-key.pem: a "
        "client-only leaf of that second CA, which /metrics accepts and no gRPC port does "
        "(the scraper verifies the services with DIR/ca.pem). Keys are 0600. An existing "
        "CA in DIR is kept, and so are the leaves already there that it signed, unless "
        "--renew: run it again to add names.",
    )
    p.add_argument(
        "names", nargs="*", metavar="NAME", help="service host names to certify (ca.pem's)"
    )
    p.add_argument("--dir", type=Path, required=True, help="where the files go (created)")
    p.add_argument(
        "--scraper",
        action="append",
        default=[],
        metavar="NAME",
        help="a scraper (Prometheus) to certify from the scrapers' CA, scraper-ca.pem (made "
        "when missing): DIR/NAME.pem + DIR/NAME-key.pem, client use only. Repeatable",
    )
    p.add_argument(
        "--days",
        type=arg_types.positive_int,
        default=30,
        help="validity of a new CA and its leaves, in days (default 30)",
    )
    p.add_argument(
        "--renew",
        action="store_true",
        help="replace the CA (and the scrapers' CA, with --scraper) and every leaf named "
        "(new keys)",
    )
    p.add_argument(
        "--owner",
        action="append",
        default=[],
        metavar="[NAME=]UID",
        help="chown the leaves' files to UID (NAME=UID: that leaf's only, a scraper's too), "
        "for containers running as other users; needs root. Repeatable. Default: the "
        "caller owns them",
    )
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from services.rpc.tls_dev_ca import CLUSTER_CA, SCRAPER_CA

    _check_names(args.names, args.scraper)
    owners = _owners(args.owner, [*args.names, *args.scraper])
    validity = datetime.timedelta(days=args.days)
    cas = [_mint(args.dir, CLUSTER_CA, args.names, args.renew, validity)]
    if args.scraper:
        cas.append(_mint(args.dir, SCRAPER_CA, args.scraper, args.renew, validity))
    for name, uid in owners.items():
        _chown(uid, args.dir / f"{name}.pem", args.dir / f"{name}-key.pem")
    if owners:
        args.dir.chmod(0o755)  # others enter; every key stays 0600 to its owner
        for ca in cas:
            ca.cert.chmod(0o644)
    return 0


def _mint(
    directory: Path, stem: str, names: list[str], renew: bool, validity: datetime.timedelta
) -> DevCa:
    """The CA ``stem`` in ``directory`` (a new one with ``renew`` or when missing) and a leaf
    per name: client-only from the scrapers' CA. A leaf already there is kept when this CA
    signed it; one of another CA (a CA replaced since, a name that moved between the two
    CAs) is issued again, since nothing here would accept it."""
    from services.rpc.tls_dev_ca import SCRAPER_CA, DevCa

    ca = DevCa(directory, stem)
    if renew or not (ca.cert.exists() and ca.key.exists()):
        ca = DevCa.create(directory, validity, stem)
        print(f"new CA {ca.cert}")
    for name in names:
        cert, key = directory / f"{name}.pem", directory / f"{name}-key.pem"
        if not renew and key.exists() and ca.signed(cert):
            print(f"kept {cert}")
            continue
        if stem == SCRAPER_CA:
            ca.issue_client(name, validity=validity)
        else:
            ca.issue(name, validity=validity)
        print(f"issued {cert}")
    return ca


_HOST_NAME = re.compile(
    r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
)
"""A DNS host name (what a service certificate names); also safe as a file name."""


def _check_names(names: list[str], scrapers: list[str]) -> None:
    """Refuse, before anything is written, names whose files would overwrite others'."""
    if not (names or scrapers):
        raise InvalidRequestError("NAME", "give at least one service NAME or --scraper NAME")
    for name in (*names, *scrapers):
        if not _HOST_NAME.fullmatch(name):
            raise InvalidRequestError(
                "NAME",
                f"{name!r} is not a host name (letters, digits, '-' and '.'; a certificate "
                "names a host, and the name is also the file's): it could write outside --dir",
            )
        if name in RESERVED:
            raise InvalidRequestError(
                "NAME", f"{name!r} would overwrite the CA's {name}.pem: choose another name"
            )
    if both := sorted(set(names) & set(scrapers)):
        raise InvalidRequestError(
            "--scraper",
            f"{both[0]!r} is also a service NAME: a scraper's certificate opens /metrics "
            "only, a service's the gRPC ports too; give the scraper a name of its own",
        )


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
