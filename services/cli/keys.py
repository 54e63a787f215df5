"""``tandem keys`` and ``tandem audit``: the operator's break-glass tools on the gateway store.

They open the store directly (no gateway needed): how the first admin key is made, how a key
is revoked when the Admin API is out of reach, and how the audit chain is checked.

An admin key is an API key with its ``admin`` flag set (``--admin``); the gateway gives such a
key the policy's ``admin_role`` at authentication, so it may call tandem.v1.Admin and read all
usage. Every mint and revoke here also appends an audit record (principal ``cli:<os user>``),
as the Admin API does. The secret is printed once, on stdout, alone on its line, so
``KEY=$(tandem keys create …)`` captures it; nothing else ever shows it.
"""

from __future__ import annotations

import argparse
import getpass
import sys
import time

STORE_HELP = (
    "the gateway's store: sqlite:PATH or postgresql://… (for `tandem up`: "
    "sqlite:<state dir>/gateway.db, printed at start)"
)


def register(subparsers: argparse._SubParsersAction) -> None:
    _register_keys(subparsers)
    _register_audit(subparsers)


def _register_keys(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "keys",
        help="mint, list or revoke gateway API keys directly in the store (bootstrap)",
        description="Manage API keys straight in the gateway's store, without a running "
        "gateway: the way to the first admin key, and a break-glass revoke. With a gateway "
        "up, the tandem.v1.Admin API does the same.",
    )
    sub = parser.add_subparsers(dest="keys_command", metavar="ACTION", required=True)

    create = sub.add_parser("create", help="mint a key and print its secret once")
    create.add_argument("--store", required=True, metavar="URL", help=STORE_HELP)
    create.add_argument("--team", required=True, metavar="T", help="team the key is charged to")
    create.add_argument(
        "--model",
        required=True,
        nargs="+",
        metavar="M",
        help="model(s) the key may use (the policy may narrow them further)",
    )
    create.add_argument(
        "--admin",
        action="store_true",
        help="give the key the policy's admin role: it may call tandem.v1.Admin (mint and "
        "revoke keys) and read every team's usage",
    )
    create.add_argument(
        "--description", default="", metavar="D", help="what the key is for (shown in lists)"
    )
    create.set_defaults(handler=run_create)

    listing = sub.add_parser("list", help="list keys (never secrets)")
    listing.add_argument("--store", required=True, metavar="URL", help=STORE_HELP)
    listing.add_argument("--team", metavar="T", help="only this team's keys")
    listing.set_defaults(handler=run_list)

    revoke = sub.add_parser("revoke", help="revoke a key at once (every replica)")
    revoke.add_argument("--store", required=True, metavar="URL", help=STORE_HELP)
    revoke.add_argument("key_id", metavar="KEY_ID", help="the key's id, as `keys list` shows")
    revoke.set_defaults(handler=run_revoke)


def _register_audit(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "audit",
        help="check the gateway's hash-chained audit log",
        description="The gateway appends one record per decision to an audit log in its "
        "store, each carrying the hash of the one before, so an edit, an insertion or a "
        "deletion inside the log is detectable; `tandem audit verify` walks and checks it.",
    )
    sub = parser.add_subparsers(dest="audit_command", metavar="ACTION", required=True)
    verify = sub.add_parser(
        "verify",
        help="verify every record's hash and link; exit 1 naming the first broken record",
        description="Walk the audit log in order and check each record's hash and its link "
        "to the previous one. Exit 0 printing how many records verified; exit 1 naming the "
        "first record that fails (edited, inserted, reordered, or following a deletion). "
        "Deleting the newest records cannot be seen from the chain alone: compare the "
        "printed head with a copy kept elsewhere.",
    )
    verify.add_argument("--store", required=True, metavar="URL", help=STORE_HELP)
    verify.set_defaults(handler=run_verify)


def existing(store_url: str) -> str:
    """``store_url``, unless it names a SQLite file that does not exist: opening would create
    an empty store, and a mistyped path then "verified 0 audit records" or listed no keys."""
    from pathlib import Path

    from services.engine.errors import InvalidRequestError
    from services.gateway.store import sqlite_path

    path = sqlite_path(store_url)
    if path is not None and path != ":memory:" and not Path(path).is_file():
        raise InvalidRequestError(
            "--store",
            f"no store at {path}: check the path (`tandem up` prints its store at start as "
            "sqlite:<state dir>/gateway.db)",
        )
    return store_url


def operator() -> str:
    """The audit principal of a CLI action: ``cli:<os user>``."""
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return "cli:unknown"


def audit_cli(store, reason: str, team: str = "") -> None:  # type: ignore[no-untyped-def]
    """One audit record for a key operation run from this machine's command line."""
    from services.gateway.audit import AuditEvent, AuditLog

    AuditLog(store).append(
        AuditEvent(principal=operator(), decision="allow", reason=reason, team=team, source="cli")
    )


def run_create(args: argparse.Namespace) -> int:
    from services.gateway.api_keys import ApiKeys
    from services.gateway.store import open_store

    with open_store(args.store) as store:
        minted = ApiKeys(store).mint(
            args.team,
            args.model,
            created_by=operator(),
            admin=args.admin,
            description=args.description,
        )
        key = minted.key
        flag = ", admin" if key.admin else ""
        audit_cli(store, f"keys create: key {key.key_id} for team {key.team}{flag}", key.team)
    print(minted.secret, flush=True)
    print(
        f"minted key {key.key_id} (team {key.team}, models {', '.join(key.models)}{flag}); "
        "the secret above is shown only now",
        file=sys.stderr,
    )
    return 0


def run_list(args: argparse.Namespace) -> int:
    from services.gateway.api_keys import ApiKeys
    from services.gateway.store import open_store

    with open_store(existing(args.store)) as store:
        keys = ApiKeys(store).list(args.team)
    from services.cli.target_call import aligned

    rows = [["KEY_ID", "TEAM", "MODELS", "ADMIN", "CREATED", "REVOKED", "DESCRIPTION"]]
    for k in keys:
        revoked = _when(k.revoked_at) if k.revoked_at is not None else "-"
        rows.append(
            [
                k.key_id,
                k.team,
                ",".join(k.models),
                "yes" if k.admin else "no",
                _when(k.created_at),
                revoked,
                k.description or "-",
            ]
        )
    print(aligned(rows, left=len(rows[0])))
    return 0


def run_revoke(args: argparse.Namespace) -> int:
    from services.gateway.api_keys import ApiKeys
    from services.gateway.store import open_store

    with open_store(existing(args.store)) as store:
        key = ApiKeys(store).revoke(args.key_id)  # KeyNotFoundError: exit 2, as any no-match
        audit_cli(store, f"keys revoke: key {key.key_id} of team {key.team}", key.team)
    print(f"revoked key {key.key_id} (team {key.team}) at {_when(key.revoked_at or 0)}")
    return 0


def run_verify(args: argparse.Namespace) -> int:
    from services.gateway.audit import AuditLog
    from services.gateway.store import open_store

    with open_store(existing(args.store)) as store:
        check = AuditLog(store).check_chain()
    head_id, head_hash = check.head
    broken = check.broken_at
    if broken is not None and broken < 1:
        print(
            f"audit chain BROKEN: a record with id {broken} lies outside the chain, whose ids "
            "start at 1 (written by hand, not by a gateway)",
            file=sys.stderr,
        )
        return 1
    if broken is not None:
        print(
            f"audit chain BROKEN at record {broken}: its hash or its link to record "
            f"{broken - 1} does not verify (records 1..{head_id} are intact)",
            file=sys.stderr,
        )
        return 1
    print(f"verified {head_id} audit records; head {head_id} {head_hash}")
    return 0


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))
