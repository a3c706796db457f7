"""TLS in the daemon (`[http.tls]`): REST over https, a wss:// native session, client
certificates, the Relaycast SDK over TLS, and the files refused at start."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path

import httpx
import msgspec
import pytest
import trio
from cryptography.hazmat.primitives import serialization

from broker.client import connect
from broker.config import ConfigError, Settings, TlsSettings
from broker.engine.engine import DATABASE_FILE
from broker.engine.mailbox import seq_marks
from broker.http.tls import check_tls
from broker.server import BrokerServer
from tests.helpers.daemon import run_server
from tests.helpers.engine import TEST_DEADLINE_S, make_world
from tests.helpers.interop import INTEROP, NODE, ensure_sdk_installed
from tests.helpers.realtime import eventually, post
from tests.helpers.rest import call, make_rest_world, uploaded
from tests.helpers.tls import Certificates, make_certificates, serving_tls


@pytest.fixture
def certs(tmp_path: Path) -> Certificates:
    return make_certificates(tmp_path / "tls")


@pytest.fixture
def settings(settings: Settings, certs: Certificates) -> Settings:
    return serving_tls(settings, certs)


@pytest.fixture
async def client(server: BrokerServer, certs: Certificates) -> AsyncIterator[httpx.AsyncClient]:
    assert server.url is not None
    async with httpx.AsyncClient(base_url=server.url, timeout=10,
                                 verify=certs.client_context()) as http:
        yield http


@pytest.mark.both_process_models
async def test_tls_rest_over_https(server: BrokerServer, client: httpx.AsyncClient) -> None:
    """The port speaks https: REST works, and the URLs it hands out are https ones."""
    assert server.url is not None and server.url.startswith("https://127.0.0.1:")
    world = await make_rest_world(client)
    sent = await call(client, "POST", "/v1/channels/general/messages", world.tokens["alice"],
                      json={"text": "over tls"})
    assert sent.status == 201, sent.body
    listed = await call(client, "GET", "/v1/channels/general/messages", world.tokens["bob"])
    assert [m["text"] for m in listed.data] == ["over tls"]
    done = await uploaded(client, world.tokens["alice"], b"0123456789")
    assert done["download_url"].startswith(f"{server.url}/v1/files/{done['id']}/content?")
    part = await client.get(done["download_url"], headers={"Range": "bytes=2-4"})
    assert (part.status_code, part.content) == (206, b"234")


async def test_tls_plain_http_client_refused(
    server: BrokerServer, client: httpx.AsyncClient
) -> None:
    """A plain-HTTP request on the TLS port gets no HTTP answer, only a closed connection;
    the daemon keeps serving https."""
    assert server.port is not None
    with trio.fail_after(TEST_DEADLINE_S):
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        async with stream:
            await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            received = b""
            while chunk := await stream.receive_some(4096):
                received += chunk
    assert b"HTTP/" not in received
    # Nothing or a TLS alert record (content type 21), never a page.
    assert received == b"" or received[0] == 21, received[:16]
    assert (await client.get("/healthz")).json() == {"ok": True, "data": {"status": "ok"}}


@pytest.mark.both_process_models
async def test_tls_wss_native_session_delivery_and_ack(
    server: BrokerServer, certs: Certificates
) -> None:
    """A native session over wss:// receives its deliveries and its ack is recorded."""
    world = await make_world(server.engine, agents=("alice", "bob"))
    url = f"wss://127.0.0.1:{server.port}/v1/ws"
    with trio.fail_after(TEST_DEADLINE_S):
        async with connect(url, world.tokens["bob"], auto_ack=False,
                           ssl_context=certs.client_context()) as bob:
            for text in ("one", "two", "three"):
                await post(server.engine, world.workspace_id, world.agents["alice"],
                           "general", text)
            got = []
            async for delivery in bob.deliveries():
                got.append((delivery.seq, delivery.data["text"]))
                if len(got) == 3:
                    break
            assert got == [(1, "one"), (2, "two"), (3, "three")]
            await bob.ack(3, wait=True)
            reply = await bob.request("message.send", channel="general", text="from bob")
            assert reply["text"] == "from bob"
    marks = await server.engine.read(seq_marks, world.workspace_id, world.agents["bob"])
    assert (marks.last_seq, marks.acked_seq) == (3, 3)


async def test_tls_client_certificate_required(
    tmp_path: Path, settings: Settings, certs: Certificates
) -> None:
    """With client_cafile, a client without a certificate of that CA is refused in the
    handshake; one with a certificate is served."""
    required = msgspec.structs.replace(
        settings, http=msgspec.structs.replace(settings.http,
                                               tls=certs.settings(client_cafile=certs.cafile)))
    with trio.fail_after(TEST_DEADLINE_S):
        async with run_server(required) as server:
            assert server.url is not None
            bare = certs.client_context()
            async with httpx.AsyncClient(base_url=server.url, verify=bare) as http:
                with pytest.raises((httpx.ConnectError, httpx.ReadError,
                                    httpx.RemoteProtocolError)):
                    await http.get("/healthz")
            holder = certs.client_context()
            certs.ca.issue_cert("agent-7@example.com").configure_cert(holder)
            async with httpx.AsyncClient(base_url=server.url, verify=holder) as http:
                assert (await http.get("/healthz")).status_code == 200


async def test_tls_sdk_over_tls(server: BrokerServer, certs: Certificates) -> None:
    """The Relaycast SDK (Node) reaches the daemon over https and wss when its runtime trusts
    the test CA (NODE_EXTRA_CA_CERTS): it connects, gets a message and acks it."""
    if NODE is None:
        pytest.skip("node is not installed")
    await ensure_sdk_installed()
    world = await make_world(server.engine, agents=("alice", "bob"))
    process: trio.Process | None = None
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            process = await nursery.start(partial(
                trio.run_process,
                [NODE, "--experimental-websocket", str(INTEROP / "sdk_realtime.mjs"),
                 server.url or "", world.tokens["bob"]],
                cwd=INTEROP, stdin=subprocess.PIPE, stdout=subprocess.PIPE, check=False,
                env={**os.environ, "NODE_EXTRA_CA_CERTS": str(certs.cafile)}))
            assert process is not None and process.stdout is not None
            try:
                seen = b""
                while b'"event":"open"' not in seen:
                    chunk = await process.stdout.receive_some()
                    assert chunk, f"the SDK process ended: {seen!r}"
                    seen += chunk
                await post(server.engine, world.workspace_id, world.agents["alice"],
                           "general", "hello over tls")
                while b"hello over tls" not in seen:
                    chunk = await process.stdout.receive_some()
                    assert chunk, f"the SDK process ended: {seen!r}"
                    seen += chunk

                async def acked() -> bool:
                    marks = await server.engine.read(seq_marks, world.workspace_id,
                                                     world.agents["bob"])
                    return marks.acked_seq == 1

                await eventually(acked)
            finally:
                process.kill()


# -- files the daemon refuses ------------------------------------------------------------


async def serve_exits(data_dir: Path, env: dict[str, str]) -> tuple[int, list[str]]:
    """Run `broker serve` with `env`; its exit status and its stderr lines."""
    with trio.fail_after(TEST_DEADLINE_S):
        done = await trio.run_process(
            [sys.executable, "-m", "broker", "serve", "--port", "0", "--data-dir",
             str(data_dir)],
            env={**os.environ, **env}, capture_stdout=True, capture_stderr=True, check=False)
    return done.returncode, done.stderr.decode().splitlines()


async def test_tls_missing_file_exits_2(tmp_path: Path, certs: Certificates) -> None:
    """A missing certificate: exit 2 with one line naming the file, before the database is
    made (every refusal of `check_tls` below takes this path)."""
    data = tmp_path / "data"
    missing = tmp_path / "nowhere" / "cert.pem"
    status, lines = await serve_exits(data, {"BROKER_HTTP_TLS_CERTFILE": str(missing),
                                             "BROKER_HTTP_TLS_KEYFILE": str(certs.keyfile)})
    assert status == 2
    assert lines == [f"broker: http.tls.certfile {missing}: cannot read: "
                     "No such file or directory"]
    assert not (data / DATABASE_FILE).exists()


def test_tls_check_names_the_bad_file(tmp_path: Path, certs: Certificates) -> None:
    """Each unusable file is named with its setting: unreadable, not PEM, an encrypted key,
    a key of another certificate."""
    other = tmp_path / "other-key.pem"
    certs.ca.issue_cert("127.0.0.1").private_key_pem.write_to_path(str(other))
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    encrypted = tmp_path / "encrypted-key.pem"
    key = serialization.load_pem_private_key(certs.keyfile.read_bytes(), password=None)
    encrypted.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret")))
    good = {"certfile": str(certs.certfile), "keyfile": str(certs.keyfile)}
    cases = [
        ({"certfile": str(tmp_path)}, f"http.tls.certfile {tmp_path}: cannot read: "
                                      "Is a directory"),
        ({"certfile": str(garbage)}, f"http.tls.certfile {garbage}: holds no PEM certificate"),
        ({"keyfile": str(garbage)}, f"http.tls.keyfile {garbage}: not a PEM private key"),
        ({"keyfile": str(certs.certfile)},
         f"http.tls.keyfile {certs.certfile}: not a PEM private key"),
        ({"keyfile": str(encrypted)}, f"http.tls.keyfile {encrypted}: the key is encrypted"),
        ({"keyfile": str(other)},
         f"http.tls.keyfile {other}: does not match the certificate in {certs.certfile}"),
        ({"client_cafile": str(garbage)},
         f"http.tls.client_cafile {garbage}: holds no PEM certificate"),
        ({"client_cafile": str(tmp_path / "none.pem")},
         f"http.tls.client_cafile {tmp_path / 'none.pem'}: cannot read"),
    ]
    for change, message in cases:
        with pytest.raises(ConfigError) as refused:
            check_tls(TlsSettings(**{**good, **change}))
        assert str(refused.value).startswith(message), (change, str(refused.value))
    check_tls(TlsSettings(**good, client_cafile=str(certs.cafile)))  # all good: no error
    with pytest.raises(ValueError, match="certfile and keyfile go together"):
        TlsSettings(certfile=str(certs.certfile))
