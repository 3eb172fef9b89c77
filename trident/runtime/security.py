"""CurveZMQ keys and authentication for a Trident cluster, in two roles.

``trident keys DIR`` writes (``--client NAME`` adds clients; rerunning keeps keys)::

    DIR/                                 0700
      cluster/                           cluster members: scheduler, nodes, workers
        cluster.key                      the cluster's public key
        cluster.key_secret               the cluster's secret key (0600): daemons only
        authorized/cluster.key           keys admitted as cluster members
      clients/
        authorized/<name>.key            keys admitted as clients
        <name>/                          hand this directory (only) to the user <name>
          <name>.key, <name>.key_secret  the client's own pair (secret 0600)
          cluster.key                    the cluster's PUBLIC key (to verify the server)

Daemons get ``--curve-dir DIR``; a user gets ``DIR/clients/<name>`` and passes it as
``curve_dir`` (``client_keys`` also accepts ``DIR`` itself with a name).

Every daemon socket that accepts connections is a CURVE server with the cluster key
and a ZAP domain naming the role it admits: the scheduler's client ROUTER is
``"client"`` (keys in ``clients/authorized/``); the scheduler's node ROUTER and each
worker's data-plane ROUTER are ``"cluster"`` (keys in ``cluster/authorized/``). A
client key cannot register a node or a worker, nor talk to a worker's data port; a
socket without a domain is denied. Every refused handshake is logged (``auth.denied``)
and a client sees it at once through :class:`HandshakeWatch`. Revoke a key by deleting
its file from ``authorized/`` (and the user's directory) and restarting the daemons or
calling ``reload()`` on the authenticator. Without ``--curve-dir`` everything runs in
the clear (loopback, tests).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import itertools
import os
import re
import shutil
import stat
import time
import warnings
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio

from trident.cliformat import DefaultsHelpFormatter
from trident.errors import ConfigError
from trident.log import get_logger
from trident.runtime.transport import CLIENT_DOMAIN, CLUSTER_DOMAIN, CurveKeys

__all__ = [
    "CLIENT_DOMAIN",
    "CLUSTER_DOMAIN",
    "HandshakeWatch",
    "build_parser",
    "client_keys",
    "daemon_keys",
    "generate_keys",
    "key_id",
    "main",
    "start_authenticator",
]

CLUSTER = "cluster"  # the cluster key pair's name and its directory
CLIENTS = "clients"
AUTHORIZED = "authorized"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_RESERVED = {CLUSTER, AUTHORIZED}

_SECRET_BANNER = """#   ****  Generated on {0} by trident keys  ****
#   ZeroMQ CURVE **Secret** Certificate
#   DO NOT PROVIDE THIS FILE TO OTHER USERS nor change its permissions.

"""
_PUBLIC_BANNER = """#   ****  Generated on {0} by trident keys  ****
#   ZeroMQ CURVE Public Certificate

"""


def key_id(public: bytes) -> str:
    """A short, loggable id for a public key: the first 8 characters of its z85 text
    (``public`` may be the 40-character z85 text or the 32 raw bytes)."""
    from zmq.utils import z85

    text = public if len(public) == 40 else z85.encode(public)
    return text[:8].decode("ascii", "replace")


# -- key files -----------------------------------------------------------------------


def _private_dir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)


def _write(path: Path, text: str, mode: int) -> None:
    """Write ``path`` atomically, created with ``mode`` (never wider, even briefly)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, text.encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _cert_text(banner: str, public: bytes, secret: bytes | None = None) -> str:
    text = banner.format(datetime.datetime.now()) + "metadata\ncurve\n"
    text += f'    public-key = "{public.decode()}"\n'
    if secret is not None:
        text += f'    secret-key = "{secret.decode()}"\n'
    return text


def _write_public(path: Path, public: bytes) -> None:
    _write(path, _cert_text(_PUBLIC_BANNER, public), 0o644)


def _read_public(path: Path) -> bytes:
    import zmq.auth

    public, _ = zmq.auth.load_certificate(path)
    return public


def _ensure_pair(directory: Path, name: str) -> bytes:
    """``directory/name.key{,_secret}``: kept when present (secret forced to 0600),
    made otherwise. Returns the public key."""
    import zmq.auth

    secret_file = directory / f"{name}.key_secret"
    public_file = directory / f"{name}.key"
    if secret_file.exists():
        os.chmod(secret_file, 0o600)
        public, secret = zmq.auth.load_certificate(secret_file)
        if secret is None:
            raise ConfigError(f"CurveZMQ: {secret_file} holds no secret key")
    else:
        public, secret = zmq.curve_keypair()
        _write(secret_file, _cert_text(_SECRET_BANNER, public, secret), 0o600)
    if not public_file.exists() or _read_public(public_file) != public:
        _write_public(public_file, public)
    return public


def _check_name(name: str) -> str:
    if not _NAME.fullmatch(name) or name in _RESERVED:
        raise ConfigError(
            f"CurveZMQ: bad client name {name!r} (letters, digits, '.', '_', '-'; not {sorted(_RESERVED)})"
        )
    return name


def _migrate_flat(d: Path) -> list[str]:
    """Move an old single-role directory (``DIR/cluster.key_secret``, ``DIR/<name>.key_secret``,
    ``DIR/authorized/``, where every authorized key was admitted everywhere) into the
    two-role layout, keeping every key. Keys found only in the old ``authorized/`` are
    kept as *client* keys. Returns the client names moved."""
    if not (d / f"{CLUSTER}.key_secret").is_file():
        return []
    cluster_dir = d / CLUSTER
    _private_dir(cluster_dir)
    for suffix in (".key", ".key_secret"):
        if (d / f"{CLUSTER}{suffix}").exists():
            os.replace(d / f"{CLUSTER}{suffix}", cluster_dir / f"{CLUSTER}{suffix}")
    known = {_ensure_pair(cluster_dir, CLUSTER)}
    moved: list[str] = []
    for secret_file in sorted(d.glob("*.key_secret")):
        name = secret_file.name[: -len(".key_secret")]
        if not _NAME.fullmatch(name) or name in _RESERVED:
            continue
        target = d / CLIENTS / name
        _private_dir(target)
        for suffix in (".key", ".key_secret"):
            if (d / f"{name}{suffix}").exists():
                os.replace(d / f"{name}{suffix}", target / f"{name}{suffix}")
        known.add(_ensure_pair(target, name))
        moved.append(name)
    old = d / AUTHORIZED
    if old.is_dir():
        keep = d / CLIENTS / AUTHORIZED
        _private_dir(keep)
        for f in sorted(old.glob("*.key")):
            try:
                public = _read_public(f)
            except (OSError, ValueError):
                continue
            if public not in known and not (keep / f.name).exists():
                shutil.copy(f, keep / f.name)
        shutil.rmtree(old)
    return moved


def generate_keys(
    directory: str | os.PathLike[str], clients: tuple[str, ...] = ("client",)
) -> Path:
    """Make (or complete) the key directory ``directory`` (layout: module docstring).

    Existing key pairs are kept; each name in ``clients`` gets a pair if it has none,
    is (re)authorized in ``clients/authorized/`` and gets the cluster's public key in
    its directory. An old single-role directory is migrated first. Secret files end up
    0600 and directories 0700. Returns the directory.
    """
    d = Path(directory)
    names = [_check_name(n) for n in clients]
    _private_dir(d)
    names += [n for n in _migrate_flat(d) if n not in names]
    cluster_dir = d / CLUSTER
    _private_dir(cluster_dir / AUTHORIZED)
    cluster_public = _ensure_pair(cluster_dir, CLUSTER)
    _write_public(cluster_dir / AUTHORIZED / f"{CLUSTER}.key", cluster_public)
    _private_dir(d / CLIENTS / AUTHORIZED)
    for name in names:
        own = d / CLIENTS / name
        _private_dir(own)
        public = _ensure_pair(own, name)
        _write_public(d / CLIENTS / AUTHORIZED / f"{name}.key", public)
        _write_public(own / f"{CLUSTER}.key", cluster_public)
        (own / f"{CLUSTER}.key_secret").unlink(missing_ok=True)  # never beside a user's keys
    for path in [d, *d.rglob("*")]:
        if path.is_symlink():
            continue
        if path.is_dir():
            os.chmod(path, 0o700)
        elif path.name.endswith(".key_secret"):
            os.chmod(path, 0o600)
    return d


def _load_pair(secret_file: Path) -> tuple[bytes, bytes]:
    import zmq.auth

    if not secret_file.is_file():
        raise ConfigError(f"CurveZMQ: {secret_file} does not exist")
    public, secret = zmq.auth.load_certificate(secret_file)
    if secret is None:
        raise ConfigError(f"CurveZMQ: {secret_file} holds no secret key")
    return public, secret


def _loose(path: Path) -> bool:
    return bool(os.stat(path).st_mode & (stat.S_IRWXG | stat.S_IRWXO))


def _old_layout_error(d: Path) -> ConfigError:
    return ConfigError(
        f"CurveZMQ: {d} uses the old single-role layout, where every authorized key was "
        f"admitted on every socket; run `trident keys {d}` to migrate it (keys are kept)"
    )


def daemon_keys(directory: str | os.PathLike[str]) -> CurveKeys:
    """The cluster's key pair from ``DIR/cluster/`` (the scheduler's, nodes' and workers')."""
    d = Path(directory)
    secret_file = d / CLUSTER / f"{CLUSTER}.key_secret"
    if not secret_file.is_file():
        if (d / f"{CLUSTER}.key_secret").is_file():
            raise _old_layout_error(d)
        raise ConfigError(
            f"CurveZMQ: {secret_file} does not exist (make keys with `trident keys {d}`)"
        )
    if _loose(secret_file):
        get_logger("auth").warning(
            "auth.key_permissions",
            path=str(secret_file),
            mode=oct(os.stat(secret_file).st_mode & 0o777),
        )
    public, secret = _load_pair(secret_file)
    return CurveKeys(public=public, secret=secret, server_public=public)


def client_keys(directory: str | os.PathLike[str], name: str = "client") -> CurveKeys:
    """A client's own pair plus the cluster's *public* key.

    ``directory`` is the directory handed to the user (``DIR/clients/<name>``: holds
    ``<name>.key_secret`` and ``cluster.key``) or the top key directory ``DIR`` (then
    ``DIR/clients/<name>`` is read).
    """
    d = Path(directory)
    own = d / CLIENTS / name
    if not (own / f"{name}.key_secret").is_file():
        own = d
    secret_file = own / f"{name}.key_secret"
    if not secret_file.is_file():
        raise ConfigError(
            f"CurveZMQ: no key {name!r}: neither {d / CLIENTS / name / (name + '.key_secret')} "
            f"nor {d / (name + '.key_secret')} exists (make it with `trident keys DIR --client {name}`)"
        )
    server_file = own / f"{CLUSTER}.key"
    if not server_file.is_file():
        raise ConfigError(f"CurveZMQ: {server_file} (the cluster's public key) does not exist")
    if (own / f"{CLUSTER}.key_secret").exists():
        warnings.warn(
            f"{own} holds the cluster's secret key; a user needs only DIR/clients/<name> "
            f"(run `trident keys` to migrate to the two-role layout)",
            stacklevel=2,
        )
    if _loose(secret_file):
        warnings.warn(f"{secret_file} is readable by others (chmod 600 it)", stacklevel=2)
    public, secret = _load_pair(secret_file)
    return CurveKeys(public=public, secret=secret, server_public=_read_public(server_file))


# -- the ZAP authenticator -------------------------------------------------------------

_LOG_EVERY_S = 10.0  # one auth.denied line per (domain, peer, key) per this long


class _TridentZap:
    """ZAP policy and logging, mixed into pyzmq's Authenticator (asyncio or thread).

    Only the CURVE mechanism, and only in a configured domain (``self.certs``): the
    base class maps an empty domain to ``"*"``, which is never configured here, and we
    deny an unknown or empty domain explicitly rather than rely on that. Every reply
    other than 200 is logged as ``auth.denied``.
    """

    certs: dict[str, dict[bytes, Any]]
    encoding: str
    allow_any: bool
    credentials_providers: dict[str, Any]
    _denied: set[str]

    def _trident_init(self, directory: Path) -> None:
        self.trident_dir = directory
        self.trident_log = get_logger("auth")
        self._request: dict[str, Any] | None = None
        self._last_logged: dict[tuple[str, str, str], tuple[float, int]] = {}

    def reload(self) -> None:
        """Re-read both authorized-key directories (after adding or revoking a key)."""
        import zmq.auth

        loaded: dict[str, dict[bytes, Any]] = {}
        for domain, location in _authorized_dirs(self.trident_dir).items():
            if not location.is_dir():
                raise ConfigError(
                    f"CurveZMQ: {location} does not exist (run `trident keys {self.trident_dir}`)"
                )
            loaded[domain] = dict(zmq.auth.load_certificates(location))
        both = set(loaded[CLIENT_DOMAIN]) & set(loaded[CLUSTER_DOMAIN])
        if both:
            self.trident_log.warning(
                "auth.key_overlap",
                detail="keys authorized both as client and as cluster member",
                key_ids=sorted(key_id(k) for k in both),
            )
        self.allow_any = False
        self.credentials_providers = {}
        self.certs = loaded

    async def handle_zap_message(self, msg: list[bytes]) -> None:
        self._request = _describe(msg, self.encoding)
        try:
            if len(msg) >= 6 and msg[0] == b"1.0" and msg[5] != b"CURVE":
                self._send_zap_reply(msg[1], b"400", b"CURVE required")
                return
            await super().handle_zap_message(msg)  # type: ignore[misc]
        finally:
            self._request = None

    async def _authenticate_curve(self, domain: str, client_key: bytes) -> tuple[bool, bytes]:
        if not domain:
            return False, b"No ZAP domain"
        if domain not in self.certs:
            return False, b"Unknown domain"
        return await super()._authenticate_curve(domain, client_key)  # type: ignore[misc]

    def _send_zap_reply(
        self, request_id: bytes, status_code: bytes, status_text: bytes, user_id: str = "anonymous"
    ) -> None:
        # Log first: the peer learns of a denial only from the reply.
        self._log_reply(status_code, status_text)
        super()._send_zap_reply(request_id, status_code, status_text, user_id)  # type: ignore[misc]

    def _log_reply(self, status_code: bytes, status_text: bytes) -> None:
        req = self._request or {}
        fields = {
            "domain": req.get("domain", ""),
            "peer": req.get("peer", ""),
            "key_id": req.get("key_id", ""),
            "mechanism": req.get("mechanism", ""),
        }
        if status_code == b"200":
            self.trident_log.debug("auth.allowed", **fields)
            return
        now = time.monotonic()
        slot = (fields["domain"], fields["peer"], fields["key_id"])
        last, suppressed = self._last_logged.get(slot, (-1e18, 0))
        if now - last < _LOG_EVERY_S:  # a peer retrying in a loop: one line per period
            self._last_logged[slot] = (last, suppressed + 1)
            return
        if len(self._last_logged) > 4096:
            self._last_logged.clear()
        self._last_logged[slot] = (now, 0)
        extra = {"suppressed": suppressed} if suppressed else {}
        status: int | str = (
            int(status_code) if status_code.isdigit() else status_code.decode("ascii", "replace")
        )
        self.trident_log.warning(
            "auth.denied",
            **fields,
            status=status,
            reason=status_text.decode(self.encoding, "replace"),
            **extra,
        )


def _describe(msg: list[bytes], encoding: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if len(msg) >= 6:
        out["domain"] = msg[2].decode(encoding, "replace")
        out["peer"] = msg[3].decode(encoding, "replace")
        out["mechanism"] = msg[5].decode(encoding, "replace")
        if msg[5] == b"CURVE" and len(msg) == 7 and len(msg[6]) == 32:
            out["key_id"] = key_id(msg[6])
    return out


def _authorized_dirs(d: Path) -> dict[str, Path]:
    return {CLIENT_DOMAIN: d / CLIENTS / AUTHORIZED, CLUSTER_DOMAIN: d / CLUSTER / AUTHORIZED}


def _authenticator_classes() -> tuple[type, type]:
    from zmq.auth.asyncio import AsyncioAuthenticator
    from zmq.auth.thread import ThreadAuthenticator

    class TridentAsyncioAuthenticator(_TridentZap, AsyncioAuthenticator):
        """ZAP on an asyncio context (the daemons'); needs a running event loop."""

    class TridentThreadAuthenticator(_TridentZap, ThreadAuthenticator):
        """ZAP on a blocking context, served from a background thread."""

    return TridentAsyncioAuthenticator, TridentThreadAuthenticator


def start_authenticator(ctx: Any, directory: str | os.PathLike[str]) -> Any:
    """Start a ZAP handler on ``ctx`` with two domains: ``"client"`` admits only the keys
    in ``DIR/clients/authorized/``, ``"cluster"`` only those in ``DIR/cluster/authorized/``;
    any other domain (or none) and any mechanism but CURVE is denied, and each denial
    is logged as ``auth.denied``. ``ctx`` is a ``zmq.asyncio.Context`` (call from a
    running event loop) or a ``zmq.Context`` (served by a thread). Returns the
    authenticator: ``.reload()`` re-reads the keys, ``.stop()`` stops it.
    """
    d = Path(directory)
    if not (d / CLUSTER).is_dir() and (d / f"{CLUSTER}.key_secret").is_file():
        raise _old_layout_error(d)
    async_cls, thread_cls = _authenticator_classes()
    auth = (async_cls if isinstance(ctx, zmq.asyncio.Context) else thread_cls)(ctx)
    auth._trident_init(d)
    auth.reload()  # raises before anything is bound
    auth.start()
    return auth


# -- the client's view of a refused handshake ---------------------------------------------

_WATCH_EVENTS = (
    zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)
_ZAP_STATUS = {
    300: "temporary failure, retry later",
    400: "key not authorized",
    500: "server's authenticator failed",
}
_watch_ids = itertools.count()


def _protocol_reason(value: int) -> str:
    names = {
        getattr(zmq, n): n[len("PROTOCOL_ERROR_") :].lower()
        for n in dir(zmq)
        if n.startswith("PROTOCOL_ERROR_")
    }
    name = names.get(value, f"code {value:#x}")
    if value == getattr(zmq, "PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH", None):
        return f"{name}: one side uses CurveZMQ and the other does not"
    if value == getattr(zmq, "PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC", None):
        return f"{name}: wrong cluster public key?"
    return name


class HandshakeWatch:
    """Notices a socket's refused CurveZMQ handshakes as they happen (so a client can
    fail with "key not authorized" instead of timing out).

    Make it right after the socket and **before** ``connect``; it works for a blocking
    ``zmq.Socket`` and for a ``zmq.asyncio.Socket`` alike (the monitor is read through
    a blocking socket on the same libzmq context, never awaited).

    ``poll(timeout=0.0)`` reads the events so far (waiting up to ``timeout`` seconds
    for one, when none has decided yet; keep 0 inside an event loop) and returns the
    failure reason while the latest handshake failed: refused by the server's ZAP
    (``"handshake refused by tcp://h:p: key not authorized (ZAP 400)"``), a protocol
    error (mechanism mismatch), or ``no_detail_limit`` failures in a row that libzmq
    does not explain (what a wrong cluster public key looks like); else None.
    ``succeeded``: the latest handshake succeeded. ``close()`` stops monitoring.
    """

    def __init__(self, sock: Any, *, no_detail_limit: int = 3) -> None:
        self.succeeded = False
        self.failure: str | None = None
        self.no_detail_limit = no_detail_limit
        self._no_detail = 0
        self._sock = sock
        self._addr = f"inproc://trident.handshake-watch.{os.getpid()}.{next(_watch_ids)}"
        sock.monitor(self._addr, _WATCH_EVENTS)
        # The monitor PAIR belongs to the socket's context (so ctx.destroy() closes it,
        # as pyzmq's get_monitor_socket does), but is read through a blocking twin when
        # that context is an asyncio one: poll() never awaits.
        self._owner: Any = sock.context.socket(zmq.PAIR)
        self._owner.setsockopt(zmq.LINGER, 0)
        self._owner.connect(self._addr)
        self._mon: Any = (
            zmq.Socket.shadow(self._owner.underlying)
            if isinstance(self._owner, zmq.asyncio.Socket)
            else self._owner
        )

    def poll(self, timeout: float = 0.0) -> str | None:
        from zmq.utils.monitor import recv_monitor_message

        if self._mon is None or self._owner.closed:
            return self.failure
        deadline = time.monotonic() + max(0.0, timeout)
        while True:
            try:
                event = recv_monitor_message(self._mon, zmq.NOBLOCK)
            except zmq.Again:
                left = deadline - time.monotonic()
                if left <= 0 or self.failure is not None or self.succeeded:
                    return self.failure
                if not self._mon.poll(int(left * 1000) + 1, zmq.POLLIN):
                    return self.failure
                continue
            self._note(event)

    def _note(self, event: dict[str, Any]) -> None:
        kind, value = int(event["event"]), int(event["value"])
        endpoint = event.get("endpoint", b"")
        where = (
            endpoint.decode("utf-8", "replace") if isinstance(endpoint, bytes) else str(endpoint)
        )
        if kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self.succeeded, self.failure, self._no_detail = True, None, 0
        elif kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            self.succeeded = False
            what = _ZAP_STATUS.get(value, "refused")
            self.failure = f"handshake refused by {where}: {what} (ZAP {value})"
        elif kind == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
            self.succeeded = False
            self.failure = f"handshake with {where} failed: {_protocol_reason(value)}"
        elif kind == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
            self.succeeded = False
            self._no_detail += 1
            if self._no_detail >= self.no_detail_limit and self.failure is None:
                self.failure = (
                    f"handshake with {where} failed {self._no_detail} times in a row "
                    f"(no detail from libzmq; wrong cluster public key?)"
                )

    def close(self) -> None:
        if self._mon is None:
            return
        if not self._sock.closed:
            with contextlib.suppress(zmq.ZMQError):
                self._sock.disable_monitor()
        self._mon = None  # a twin owns nothing; the owner closes the libzmq socket
        self._owner.close(linger=0)

    def __enter__(self) -> HandshakeWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def build_parser() -> argparse.ArgumentParser:
    """``trident keys``'s command line."""
    p = argparse.ArgumentParser(
        prog="trident keys",
        description="Make CurveZMQ keys for a cluster (or complete an existing key directory).",
        formatter_class=DefaultsHelpFormatter,
    )
    p.add_argument(
        "directory", help="the key directory to make or complete (each daemon's --curve-dir)"
    )
    p.add_argument(
        "--client",
        action="append",
        default=[],
        metavar="NAME",
        help="a client key to make and admit (repeatable; default: one named client)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        d = generate_keys(args.directory, tuple(args.client) or ("client",))
    except ConfigError as exc:
        print(f"trident keys: {exc}")
        return 2
    names = sorted(x.name for x in (d / CLIENTS).iterdir() if x.is_dir() and x.name != AUTHORIZED)
    print(f"keys in {d}:")
    print(
        f"  daemons (scheduler, nodes, workers): --curve-dir {d}  (holds the cluster secret: keep it on cluster hosts)"
    )
    for name in names:
        print(
            f"  user {name}: hand over {d / CLIENTS / name}/ and use curve_dir={d / CLIENTS / name}"
        )
    print(
        f"  admitted: clients {d / CLIENTS / AUTHORIZED}/, cluster members {d / CLUSTER / AUTHORIZED}/"
    )
    return 0
