"""The TLS flags every service and client shares, and the TlsConfig they describe.

Services (router, workers, gateway): ``--tls-cert`` and ``--tls-key`` are the service's
identity, served on its port and presented when it dials others; ``--tls-ca`` is the CA that
signs its peers: with all three the service requires client certificates (mTLS), on its
port and on ``/metrics``; ``--metrics-client-ca`` gives ``/metrics`` a CA of its own, the
scrapers', so that a scraper's certificate opens nothing else. Clients
(``generate --target``, ``bench serve``): ``--tls-ca`` verifies the server, ``--tls-cert`` and
``--tls-key`` are an optional client certificate. Nothing here reads a file: the services
check them at start (``services.rpc.tls.load``).

A service's three flags default to $TANDEM_TLS_CERT, $TANDEM_TLS_KEY and $TANDEM_TLS_CA, so a
deployment can turn TLS on with environment and mounts alone (deploy/compose.tls.yaml) and
the container's health probe (tandem-health) reads the same three; ``--metrics-client-ca``
defaults to $TANDEM_METRICS_CLIENT_CA.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING

from services.engine.errors import InvalidRequestError

if TYPE_CHECKING:
    from services.rpc.tls import TlsConfig


SERVICE_CA_HELP = (
    "PEM CA bundle that signs the other services: verifies the services this one dials, and "
    "callers must present a certificate it signed (mTLS)"
)


def add_service_tls_args(
    parser: argparse.ArgumentParser, ca_help: str = SERVICE_CA_HELP
) -> argparse._ArgumentGroup:
    group = parser.add_argument_group("TLS")
    group.add_argument(
        "--tls-cert",
        metavar="FILE",
        default=os.environ.get("TANDEM_TLS_CERT") or None,
        help="PEM certificate: serve TLS on this service's port and present it when dialing "
        "other services (with --tls-key; default: $TANDEM_TLS_CERT, else plaintext)",
    )
    group.add_argument(
        "--tls-key",
        metavar="FILE",
        default=os.environ.get("TANDEM_TLS_KEY") or None,
        help="PEM private key of --tls-cert (default: $TANDEM_TLS_KEY)",
    )
    group.add_argument(
        "--tls-ca",
        metavar="FILE",
        default=os.environ.get("TANDEM_TLS_CA") or None,
        help=f"{ca_help} (default: $TANDEM_TLS_CA)",
    )
    group.add_argument(
        "--metrics-client-ca",
        metavar="FILE",
        default=os.environ.get("TANDEM_METRICS_CLIENT_CA") or None,
        help="PEM CA bundle that signs the scrapers' (Prometheus's) client certificates: "
        "/metrics then accepts only certificates it signed (not --tls-ca's) while the other "
        "ports keep trusting what they trusted, so a scraper's certificate opens /metrics "
        "and nothing else. Use a CA apart from --tls-ca's (`tandem tls-dev-ca --scraper`). "
        "Needs --tls-cert/--tls-key; a file replaced in place is used from the next scrape "
        "on, as theirs are (default: $TANDEM_METRICS_CLIENT_CA, else /metrics asks what the "
        "service's cluster port asks: a certificate signed by --tls-ca when it is given)",
    )
    return group


def add_client_tls_args(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    parser.add_argument(
        "--tls-ca",
        metavar="FILE",
        help="connect over TLS, verifying the server with this PEM CA bundle (`tandem up "
        "--tls` prints its ca.pem)",
    )
    parser.add_argument(
        "--tls",
        action="store_true",
        help="connect over TLS, verifying the server with the system's trust store",
    )
    parser.add_argument(
        "--tls-cert",
        metavar="FILE",
        help="client certificate (PEM) for a server that requires one (with --tls-key)",
    )
    parser.add_argument("--tls-key", metavar="FILE", help="PEM private key of --tls-cert")


def service_tls(args: argparse.Namespace) -> TlsConfig | None:
    """The service's TlsConfig (mTLS with --tls-ca), None without TLS flags; an
    InvalidRequestError names an incomplete set."""
    from services.rpc.tls import TlsConfig

    cert, key, ca = args.tls_cert, args.tls_key, args.tls_ca
    if not (cert or key or ca):
        return None
    if not (cert and key):
        raise InvalidRequestError(
            "--tls-cert/--tls-key",
            "a service needs both its certificate and its key to serve TLS (with --tls-ca "
            "it also requires client certificates)",
        )
    return TlsConfig.from_files(cert, key, ca, require_client_auth=bool(ca))


def metrics_client_ca(args: argparse.Namespace) -> Path | None:
    """The CA /metrics takes scrapers' certificates from (--metrics-client-ca), None when
    it follows the service's TLS; an InvalidRequestError when there is no certificate to
    serve HTTPS with."""
    client_ca = args.metrics_client_ca
    if not client_ca:
        return None
    if not (args.tls_cert and args.tls_key):
        raise InvalidRequestError(
            "--metrics-client-ca",
            "asking scrapers for certificates needs HTTPS on /metrics: give --tls-cert and "
            "--tls-key too, or drop --metrics-client-ca ($TANDEM_METRICS_CLIENT_CA)",
        )
    return Path(client_ca)


def gateway_tls(args: argparse.Namespace) -> tuple[TlsConfig | None, TlsConfig | None]:
    """The gateway's public TlsConfig (client certificates only with --client-ca: public
    clients carry bearer tokens) and the one it dials the router with (mTLS with --tls-ca)."""
    from services.rpc.tls import TlsConfig

    cert, key, ca, client_ca = args.tls_cert, args.tls_key, args.tls_ca, args.client_ca
    if not (cert or key or ca or client_ca):
        return None, None
    if not (cert and key):
        raise InvalidRequestError(
            "--tls-cert/--tls-key",
            "the gateway needs both its certificate and its key for TLS (--tls-ca and "
            "--client-ca only say whom to trust)",
        )
    public = TlsConfig.from_files(cert, key, client_ca, require_client_auth=bool(client_ca))
    return public, TlsConfig.from_files(cert, key, ca)


def client_tls(args: argparse.Namespace) -> TlsConfig | None:
    """The client's TlsConfig, None for plaintext; InvalidRequestError for a half-given pair."""
    from services.rpc.tls import TlsConfig

    cert, key, ca = args.tls_cert, args.tls_key, args.tls_ca
    if not (cert or key or ca or args.tls):
        return None
    if bool(cert) != bool(key):
        raise InvalidRequestError("--tls-cert/--tls-key", "a client certificate needs its key")
    return TlsConfig.from_files(cert, key, ca)
