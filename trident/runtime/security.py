"""CurveZMQ keys and authentication for a Trident cluster.

A key directory (``trident keys DIR``) holds::

    DIR/cluster.key, cluster.key_secret   the daemons' key pair (scheduler, nodes, workers)
    DIR/client.key,  client.key_secret    a client key pair (add more with --client NAME)
    DIR/authorized/*.key                  public keys allowed to connect

Every daemon socket that accepts connections (the scheduler's client and node
ROUTERs, each worker's data-plane ROUTER) is a CURVE server with the cluster key and
a ZAP authenticator admitting only the keys in ``authorized/``; every connecting
socket is a CURVE client that knows the cluster's public key. Traffic is encrypted
and peers are authenticated; a client without an authorized key cannot complete the
handshake. Without ``--curve-dir`` everything runs in the clear (loopback, tests).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from trident.errors import ConfigError
from trident.runtime.transport import CurveKeys

__all__ = ["client_keys", "daemon_keys", "generate_keys", "main", "start_authenticator"]


def generate_keys(directory: str | os.PathLike[str], clients: tuple[str, ...] = ("client",)) -> Path:
    import zmq.auth

    d = Path(directory)
    (d / "authorized").mkdir(parents=True, exist_ok=True)
    for name in ("cluster", *clients):
        if not (d / f"{name}.key_secret").exists():
            zmq.auth.create_certificates(str(d), name)
        shutil.copy(d / f"{name}.key", d / "authorized" / f"{name}.key")
    os.chmod(d, 0o700)
    return d


def _load(directory: str | os.PathLike[str], name: str) -> tuple[bytes, bytes]:
    import zmq.auth

    path = Path(directory) / f"{name}.key_secret"
    if not path.exists():
        raise ConfigError(f"CurveZMQ: {path} does not exist (make keys with `trident keys {directory}`)")
    public, secret = zmq.auth.load_certificate(str(path))
    if secret is None:
        raise ConfigError(f"CurveZMQ: {path} holds no secret key")
    return public, secret


def daemon_keys(directory: str | os.PathLike[str]) -> CurveKeys:
    public, secret = _load(directory, "cluster")
    return CurveKeys(public=public, secret=secret, server_public=public)


def client_keys(directory: str | os.PathLike[str], name: str = "client") -> CurveKeys:
    """A client's own pair plus the cluster's *public* key (clients never need the
    cluster's secret: a key directory handed to a user holds only cluster.key)."""
    import zmq.auth

    public, secret = _load(directory, name)
    server_file = Path(directory) / "cluster.key"
    if not server_file.exists():
        raise ConfigError(f"CurveZMQ: {server_file} (the cluster's public key) does not exist")
    server_public, _ = zmq.auth.load_certificate(str(server_file))
    return CurveKeys(public=public, secret=secret, server_public=server_public)


def start_authenticator(ctx: Any, directory: str | os.PathLike[str]) -> Any:
    """A ZAP handler on ``ctx`` admitting the public keys in ``DIR/authorized``."""
    from zmq.auth.asyncio import AsyncioAuthenticator

    location = Path(directory) / "authorized"
    if not location.is_dir():
        raise ConfigError(f"CurveZMQ: {location} does not exist")
    auth = AsyncioAuthenticator(ctx)
    auth.start()
    auth.configure_curve(domain="*", location=str(location))
    return auth


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="trident keys", description="Make CurveZMQ keys for a cluster.")
    p.add_argument("directory")
    p.add_argument("--client", action="append", default=[], help="client key names (default: client)")
    args = p.parse_args(argv)
    d = generate_keys(args.directory, tuple(args.client) or ("client",))
    print(f"keys in {d}: cluster.key_secret for daemons, <client>.key_secret for clients; authorized/ lists who may connect")
    return 0
