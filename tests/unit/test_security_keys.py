"""CurveZMQ roles: the key layout ``trident keys`` writes, and which keys each ZAP
domain admits (loopback sockets, real handshakes)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
import zmq
import zmq.asyncio
import zmq.auth

import trident.log
from trident.errors import ConfigError
from trident.runtime.security import (
    HandshakeWatch,
    client_keys,
    daemon_keys,
    generate_keys,
    key_id,
    start_authenticator,
)
from trident.runtime.transport import (
    CLIENT_MAX_MESSAGE_BYTES,
    MAX_MESSAGE_BYTES,
    CurveKeys,
    bound_address,
    make_socket,
)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def keydir(tmp_path: Path) -> Path:
    return generate_keys(tmp_path / "keys", clients=("client", "alice"))


class _Lines(io.StringIO):
    """The JSON lines Trident's logging writes, parsed as they come."""

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.getvalue().splitlines() if line.strip()]


@contextlib.contextmanager
def _captured() -> Iterator[_Lines]:
    """Trident's structlog output (configure_logging to a buffer) for loggers made
    inside the block (the authenticator's); the previous configuration comes back."""
    saved, was_configured = structlog.get_config(), trident.log._configured
    out = _Lines()
    try:
        trident.log.configure_logging(stream=out)
        yield out
    finally:
        structlog.configure(**saved)
        trident.log._configured = was_configured


def _denials(logs: _Lines) -> list[dict[str, Any]]:
    return [e for e in logs.events() if e.get("event") == "auth.denied"]


# -- layout and permissions -------------------------------------------------------------


def test_generate_keys_layout_and_permissions(keydir: Path) -> None:
    d = keydir
    assert _mode(d) == 0o700
    for sub in ("cluster", "cluster/authorized", "clients", "clients/authorized", "clients/client"):
        assert (d / sub).is_dir() and _mode(d / sub) == 0o700, sub
    secrets = sorted(d.rglob("*.key_secret"))
    assert {p.relative_to(d).as_posix() for p in secrets} == {
        "cluster/cluster.key_secret",
        "clients/client/client.key_secret",
        "clients/alice/alice.key_secret",
    }
    assert all(_mode(p) == 0o600 for p in secrets)
    assert {p.name for p in (d / "cluster" / "authorized").iterdir()} == {"cluster.key"}
    assert {p.name for p in (d / "clients" / "authorized").iterdir()} == {"client.key", "alice.key"}

    # The directory handed to a user: its own pair and the cluster's public key, only.
    cluster_public, cluster_secret = zmq.auth.load_certificate(d / "cluster" / "cluster.key_secret")
    assert cluster_secret is not None
    for name in ("client", "alice"):
        own = d / "clients" / name
        assert {p.name for p in own.iterdir()} == {
            f"{name}.key",
            f"{name}.key_secret",
            "cluster.key",
        }
        assert zmq.auth.load_certificate(own / "cluster.key") == (cluster_public, None)
    for f in (d / "clients").rglob("*"):
        if f.is_file():
            assert cluster_secret not in f.read_bytes(), f

    daemon = daemon_keys(d)
    assert daemon == CurveKeys(cluster_public, cluster_secret, cluster_public)
    alice = client_keys(d / "clients" / "alice", "alice")
    assert alice.server_public == cluster_public and alice.public != cluster_public
    # The top directory works for clients too (default name "client").
    assert client_keys(d) == client_keys(d / "clients" / "client")
    with pytest.raises(ConfigError):
        client_keys(d, "nobody")

    # Rerunning keeps every key and adds the new client.
    (d / "clients" / "alice" / "alice.key_secret").chmod(0o644)
    again = generate_keys(d, clients=("bob",))
    assert daemon_keys(again) == daemon
    assert client_keys(again, "alice") == alice
    assert _mode(d / "clients" / "alice" / "alice.key_secret") == 0o600
    assert (d / "clients" / "authorized" / "bob.key").is_file()


def test_generate_keys_rejects_bad_names(tmp_path: Path) -> None:
    for bad in ("cluster", "authorized", "../x", "", ".hidden", "a/b"):
        with pytest.raises(ConfigError):
            generate_keys(tmp_path / "k", clients=(bad,))


def test_old_flat_layout_is_refused_then_migrated(tmp_path: Path) -> None:
    d = tmp_path / "old"
    (d / "authorized").mkdir(parents=True)
    for name in ("cluster", "client"):
        zmq.auth.create_certificates(d, name)
        (d / "authorized" / f"{name}.key").write_bytes((d / f"{name}.key").read_bytes())
    extra = tmp_path / "extra"
    extra.mkdir()
    zmq.auth.create_certificates(extra, "carol")  # a key an admin added by hand
    (d / "authorized" / "carol.key").write_bytes((extra / "carol.key").read_bytes())
    cluster = zmq.auth.load_certificate(d / "cluster.key_secret")
    client = zmq.auth.load_certificate(d / "client.key_secret")

    with pytest.raises(ConfigError, match="old single-role layout"):
        daemon_keys(d)
    with pytest.raises(ConfigError, match="old single-role layout"):
        start_authenticator(zmq.Context(), d)

    generate_keys(d)
    assert not (d / "authorized").exists() and not (d / "cluster.key_secret").exists()
    assert (daemon_keys(d).public, daemon_keys(d).secret) == cluster
    assert (client_keys(d).public, client_keys(d).secret) == client
    assert {p.name for p in (d / "cluster" / "authorized").iterdir()} == {"cluster.key"}
    assert {p.name for p in (d / "clients" / "authorized").iterdir()} == {"client.key", "carol.key"}
    assert _mode(d / "clients" / "client" / "client.key_secret") == 0o600


# -- make_socket ------------------------------------------------------------------------


def test_make_socket_domain_and_message_cap() -> None:
    ctx = zmq.Context()
    try:
        public, secret = zmq.curve_keypair()
        with pytest.raises(ValueError, match="zap_domain"):
            make_socket(ctx, zmq.ROUTER, curve=CurveKeys(public, secret), curve_server=True)
        make_socket(ctx, zmq.ROUTER, curve_server=True)  # no curve: plain, no domain needed
        with pytest.raises(ValueError, match="zap_domain"):
            make_socket(ctx, zmq.ROUTER, curve_server=True, zap_domain="everyone")
        with pytest.raises(ValueError, match="zap_domain"):
            make_socket(ctx, zmq.DEALER, zap_domain="client")
        plain = make_socket(ctx, zmq.ROUTER, curve_server=True, zap_domain="client")
        assert plain.getsockopt(zmq.MAXMSGSIZE) == MAX_MESSAGE_BYTES
        assert plain.getsockopt(zmq.ZAP_DOMAIN) == b""  # no curve: not set
        capped = make_socket(
            ctx,
            zmq.ROUTER,
            curve_server=True,
            zap_domain="client",
            max_message_bytes=CLIENT_MAX_MESSAGE_BYTES,
        )
        assert capped.getsockopt(zmq.MAXMSGSIZE) == CLIENT_MAX_MESSAGE_BYTES == 1 << 20
        server = make_socket(
            ctx,
            zmq.ROUTER,
            curve=CurveKeys(public, secret),
            curve_server=True,
            zap_domain="cluster",
        )
        assert server.getsockopt(zmq.ZAP_DOMAIN) == b"cluster"
        assert server.getsockopt(zmq.CURVE_SERVER) == 1
    finally:
        ctx.destroy(linger=0)


# -- handshakes ---------------------------------------------------------------------------


async def _echo(router: Any) -> None:
    while True:
        ident, payload = await router.recv_multipart()
        await router.send_multipart([ident, b"echo:" + payload])


async def _wait_failure(watch: HandshakeWatch, seconds: float = 5.0) -> str | None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        reason = watch.poll()
        if reason is not None:
            return reason
        await asyncio.sleep(0.02)
    return None


def test_cluster_domain_admits_cluster_key_and_denies_client_key(keydir: Path) -> None:
    """The bug: the client key handed to users was accepted on the node/data ports."""

    async def scenario(logs: _Lines) -> None:
        server_ctx, peer_ctx = zmq.asyncio.Context(), zmq.asyncio.Context()
        auth = start_authenticator(server_ctx, keydir)
        router = make_socket(
            server_ctx,
            zmq.ROUTER,
            curve=daemon_keys(keydir),
            curve_server=True,
            zap_domain="cluster",
        )
        router.bind("tcp://127.0.0.1:*")
        addr = bound_address(router)
        echo = asyncio.ensure_future(_echo(router))
        watches: list[HandshakeWatch] = []
        try:
            member = make_socket(peer_ctx, zmq.DEALER, curve=daemon_keys(keydir))
            member_watch = HandshakeWatch(member)
            watches.append(member_watch)
            member.connect(addr)
            await member.send(b"hello")
            assert await asyncio.wait_for(member.recv(), 5) == b"echo:hello"
            assert member_watch.poll() is None and member_watch.succeeded

            user = client_keys(keydir / "clients" / "client")
            intruder = make_socket(peer_ctx, zmq.DEALER, curve=user)
            watch = HandshakeWatch(intruder)
            watches.append(watch)
            intruder.connect(addr)
            with contextlib.suppress(zmq.Again):  # see the blocking test below
                await intruder.send(b"register me", zmq.NOBLOCK)
            reason = await _wait_failure(watch)
            assert (
                reason is not None and "key not authorized (ZAP 400)" in reason and addr in reason
            )
            assert not watch.succeeded
            assert await intruder.poll(300) == 0  # no reply, ever
            for _ in range(100):
                if _denials(logs):
                    break
                await asyncio.sleep(0.01)
            (denied,) = _denials(logs)
            assert denied["domain"] == "cluster"
            assert denied["peer"] == "127.0.0.1"
            assert denied["key_id"] == key_id(user.public)
            assert denied["level"] == "warning" and denied["component"] == "auth"
        finally:
            for w in watches:
                w.close()
            echo.cancel()
            auth.stop()
            server_ctx.destroy(linger=0)
            peer_ctx.destroy(linger=0)

    with _captured() as logs:
        asyncio.run(scenario(logs))


def test_client_domain_admits_client_key_and_denies_unknown_keys(keydir: Path) -> None:
    """Blocking contexts: a thread-served authenticator and a blocking HandshakeWatch."""
    with _captured() as logs:
        server_ctx, peer_ctx = zmq.Context(), zmq.Context()
        auth = start_authenticator(server_ctx, keydir)
        try:
            router = make_socket(
                server_ctx,
                zmq.ROUTER,
                curve=daemon_keys(keydir),
                curve_server=True,
                zap_domain="client",
            )
            router.bind("tcp://127.0.0.1:*")
            addr = bound_address(router)

            for name in ("client", "alice"):
                sock = make_socket(peer_ctx, zmq.DEALER, curve=client_keys(keydir, name))
                sock.connect(addr)
                sock.send(name.encode())
                assert router.poll(5000)
                assert router.recv_multipart()[1] == name.encode()
                sock.close()

            cluster = daemon_keys(keydir)
            stranger_public, stranger_secret = zmq.curve_keypair()
            for keys in (
                CurveKeys(stranger_public, stranger_secret, cluster.server_public),
                cluster,
            ):
                sock = make_socket(peer_ctx, zmq.DEALER, curve=keys)
                with HandshakeWatch(sock) as watch:
                    sock.connect(addr)
                    # Without blocking: on a loaded machine the denial can come before
                    # the send, and a DEALER with no live peer then blocks on send
                    # forever (CI: a 120 s timeout). The handshake needs no message.
                    with contextlib.suppress(zmq.Again):
                        sock.send(b"let me in", zmq.NOBLOCK)
                    reason = watch.poll(timeout=5.0)
                    assert reason is not None and "ZAP 400" in reason
                assert router.poll(200) == 0
                sock.close()
            denied = _denials(logs)
            assert [e["domain"] for e in denied] == ["client", "client"]
            assert [e["key_id"] for e in denied] == [
                key_id(stranger_public),
                key_id(cluster.public),
            ]
        finally:
            auth.stop()
            server_ctx.destroy(linger=0)
            peer_ctx.destroy(linger=0)


def test_socket_without_domain_is_denied_and_reload_revokes(keydir: Path) -> None:
    with _captured() as logs:
        server_ctx, peer_ctx = zmq.Context(), zmq.Context()
        auth = start_authenticator(server_ctx, keydir)
        try:
            daemon = daemon_keys(keydir)
            bare = server_ctx.socket(zmq.ROUTER)  # CURVE server, no ZAP domain
            bare.curve_publickey, bare.curve_secretkey, bare.curve_server = (
                daemon.public,
                daemon.secret,
                True,
            )
            bare.linger = 0
            bare.bind("tcp://127.0.0.1:*")
            sock = make_socket(peer_ctx, zmq.DEALER, curve=daemon)
            with HandshakeWatch(sock) as watch:
                sock.connect(bound_address(bare))
                assert "ZAP 400" in (watch.poll(timeout=5.0) or "")
            sock.close()
            assert _denials(logs)[-1]["reason"] == "No ZAP domain"

            router = make_socket(
                server_ctx, zmq.ROUTER, curve=daemon, curve_server=True, zap_domain="client"
            )
            router.bind("tcp://127.0.0.1:*")
            (keydir / "clients" / "authorized" / "alice.key").unlink()
            auth.reload()
            sock = make_socket(peer_ctx, zmq.DEALER, curve=client_keys(keydir, "alice"))
            with HandshakeWatch(sock) as watch:
                sock.connect(bound_address(router))
                assert "key not authorized" in (watch.poll(timeout=5.0) or "")
            sock.close()
        finally:
            auth.stop()
            server_ctx.destroy(linger=0)
            peer_ctx.destroy(linger=0)


def test_watch_reports_wrong_cluster_public_key(keydir: Path) -> None:
    server_ctx, peer_ctx = zmq.Context(), zmq.Context()
    auth = start_authenticator(server_ctx, keydir)
    try:
        router = make_socket(
            server_ctx,
            zmq.ROUTER,
            curve=daemon_keys(keydir),
            curve_server=True,
            zap_domain="client",
        )
        router.bind("tcp://127.0.0.1:*")
        mine = client_keys(keydir)
        wrong_server, _ = zmq.curve_keypair()
        sock = make_socket(
            peer_ctx, zmq.DEALER, curve=CurveKeys(mine.public, mine.secret, wrong_server)
        )
        with HandshakeWatch(sock) as watch:
            sock.connect(bound_address(router))
            deadline = time.monotonic() + 5
            reason = None
            while reason is None and time.monotonic() < deadline:
                reason = watch.poll(timeout=0.5)
            assert reason is not None and "wrong cluster public key" in reason
        sock.close()
    finally:
        auth.stop()
        server_ctx.destroy(linger=0)
        peer_ctx.destroy(linger=0)


def test_unclosed_watch_does_not_block_context_destroy() -> None:
    """The monitor PAIR belongs to the socket's context: destroy() closes it too."""
    for ctx in (zmq.Context(), zmq.asyncio.Context()):
        sock = make_socket(ctx, zmq.DEALER)
        watch = HandshakeWatch(sock)
        sock.connect("tcp://127.0.0.1:9")
        assert watch.poll() is None and not watch.succeeded
        ctx.destroy(linger=0)  # would hang in term() if the PAIR were left open
        assert watch.poll() is None
        watch.close()
