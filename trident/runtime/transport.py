"""The one factory that makes every ZeroMQ socket, and its security settings.

Every socket is made here so that its limits are explicit and uniform: high-water
marks (bounded queues), linger (no hang on close), ``ROUTER_MANDATORY`` (a send to a
vanished peer fails loudly instead of being dropped), ZMTP heartbeats (dead TCP peers
are noticed), a maximum message size (oversized input is cut off by libzmq before it
costs memory), and CurveZMQ keys when configured.

A CURVE server socket must name its ZAP domain, the role of the peers it admits
(:data:`CLIENT_DOMAIN`: users' clients, on the scheduler's client port;
:data:`CLUSTER_DOMAIN`: scheduler, nodes and workers, on the scheduler's node port and
the workers' data ports). The authenticator (:mod:`trident.runtime.security`) admits a
key only in the domain it is authorized for, and denies a socket without a domain.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio

__all__ = [
    "CLIENT_DOMAIN",
    "CLIENT_MAX_MESSAGE_BYTES",
    "CLUSTER_DOMAIN",
    "MAX_MESSAGE_BYTES",
    "ZAP_DOMAINS",
    "CurveKeys",
    "SocketKind",
    "bound_address",
    "load_curve_keys",
    "make_socket",
]

SocketKind = int  # zmq.ROUTER, zmq.DEALER

DEFAULT_HWM = 10_000
DEFAULT_LINGER_MS = 0
MAX_MESSAGE_BYTES = 8 << 30  # per message; a larger one closes the connection
# The scheduler's client-facing socket: requests are small (tensors travel only
# between cluster members), so an unauthenticated-size message is cut off early.
CLIENT_MAX_MESSAGE_BYTES = 1 << 20

CLIENT_DOMAIN = "client"  # ZAP domain of sockets that admit users' client keys
CLUSTER_DOMAIN = "cluster"  # ZAP domain of sockets that admit cluster members' keys
ZAP_DOMAINS = (CLIENT_DOMAIN, CLUSTER_DOMAIN)


@dataclass(frozen=True)
class CurveKeys:
    """CurveZMQ keys (z85 text). Servers need ``secret`` + ``public``; clients need
    their own pair and ``server_public``."""

    public: bytes
    secret: bytes
    server_public: bytes | None = None


def load_curve_keys(directory: str | os.PathLike[str], name: str) -> CurveKeys:
    """Read ``NAME.key`` / ``NAME.key_secret`` written by ``zmq.auth.create_certificates``."""
    import zmq.auth

    d = Path(directory)
    public, secret = zmq.auth.load_certificate(d / f"{name}.key_secret")
    if secret is None:
        raise ValueError(f"{d / (name + '.key_secret')} holds no secret key")
    server_public = None
    server_file = d / "server.key"
    if name != "server" and server_file.exists():
        server_public, _ = zmq.auth.load_certificate(server_file)
    return CurveKeys(public=public, secret=secret, server_public=server_public)


def make_socket(
    ctx: zmq.Context[Any] | zmq.asyncio.Context,
    kind: SocketKind,
    *,
    identity: bytes | None = None,
    hwm: int = DEFAULT_HWM,
    heartbeat_ms: int = 1000,
    curve: CurveKeys | None = None,
    curve_server: bool = False,
    zap_domain: str | None = None,
    max_message_bytes: int | None = None,
) -> Any:
    """A socket with Trident's settings. Bind/connect is the caller's.

    ``curve_server``: this socket accepts connections (a ROUTER that binds); with
    ``curve`` set it is a CurveZMQ server and must name ``zap_domain``
    (:data:`CLIENT_DOMAIN` or :data:`CLUSTER_DOMAIN`: the role of the peers it admits),
    else ValueError. Passing the domain unconditionally is fine: without ``curve`` it
    is checked but not set (a NULL socket with a domain would consult ZAP).
    ``max_message_bytes``: this socket's MAXMSGSIZE (default :data:`MAX_MESSAGE_BYTES`;
    the scheduler's client socket passes :data:`CLIENT_MAX_MESSAGE_BYTES`; -1: no cap).
    """
    if curve_server and curve is not None and zap_domain is None:
        raise ValueError("a CurveZMQ server socket needs zap_domain ('client' or 'cluster')")
    if zap_domain is not None and zap_domain not in ZAP_DOMAINS:
        raise ValueError(f"zap_domain must be one of {ZAP_DOMAINS}, not {zap_domain!r}")
    if zap_domain is not None and not curve_server:
        raise ValueError("zap_domain applies to a CurveZMQ server socket (curve_server=True)")
    limit = MAX_MESSAGE_BYTES if max_message_bytes is None else int(max_message_bytes)
    if limit <= 0 and limit != -1:
        raise ValueError(f"max_message_bytes must be positive or -1 (no cap), not {limit}")
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, DEFAULT_LINGER_MS)
    sock.setsockopt(zmq.SNDHWM, hwm)
    sock.setsockopt(zmq.RCVHWM, hwm)
    sock.setsockopt(zmq.MAXMSGSIZE, limit)
    if heartbeat_ms > 0:
        sock.setsockopt(zmq.HEARTBEAT_IVL, heartbeat_ms)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, heartbeat_ms * 3)
        sock.setsockopt(zmq.HEARTBEAT_TTL, heartbeat_ms * 3)
    if identity is not None:
        sock.setsockopt(zmq.IDENTITY, identity)
    if kind == zmq.ROUTER:
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        # A reconnecting peer with the same identity (a restarted worker) takes over.
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
    if curve is not None:
        sock.setsockopt(zmq.CURVE_PUBLICKEY, curve.public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, curve.secret)
        if curve_server:
            assert zap_domain is not None
            # ZAP_DOMAIN before CURVE_SERVER/bind: the handshake reads it per connection.
            sock.setsockopt(zmq.ZAP_DOMAIN, zap_domain.encode())
            sock.setsockopt(zmq.CURVE_SERVER, 1)
        else:
            if curve.server_public is None:
                raise ValueError("a CurveZMQ client needs the server's public key")
            sock.setsockopt(zmq.CURVE_SERVERKEY, curve.server_public)
    return sock


def bound_address(sock: Any) -> str:
    """The concrete address a socket bound to (resolves ``tcp://host:*``)."""
    addr = sock.getsockopt(zmq.LAST_ENDPOINT)
    return addr.decode() if isinstance(addr, bytes) else str(addr)
