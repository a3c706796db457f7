"""TLS for a load run: `--tls` and `--ca-file`.

`--tls` makes a throwaway CA for the run (trustme, from the `[bench]`
extra), and a certificate for 127.0.0.1 that it signs; the daemon the run
starts serves TLS with it (`[http.tls]`, set through the environment) and so
does the echo server, so the ceiling is measured over the same transport.
Every client of the run (REST set-up, sockets, /metrics) trusts that CA and
no other. `--ca-file` is the same trust for a daemon reached with `--url
https://...` whose certificate a private CA signed.
"""

from __future__ import annotations

import functools
import ssl
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

if TYPE_CHECKING:
    import trustme


class RunCertificate(msgspec.Struct, frozen=True):
    """PEM files of one run: the CA, and the server's chain and key (for 127.0.0.1)."""

    cafile: str
    certfile: str
    keyfile: str

    def daemon_environ(self) -> dict[str, str]:
        """What makes `broker serve` serve TLS with this certificate, and ask no client for
        one, whatever a `--config` file says (the environment overrides it)."""
        return {"BROKER_HTTP_TLS_CERTFILE": self.certfile,
                "BROKER_HTTP_TLS_KEYFILE": self.keyfile,
                "BROKER_HTTP_TLS_CLIENT_CAFILE": ""}

    def echo_arguments(self) -> list[str]:
        """What makes the echo server (`broker.loadtest.echo`) serve TLS with it."""
        return ["--certfile", self.certfile, "--keyfile", self.keyfile]


def make_certificate(directory: Path, ca: trustme.CA | None = None) -> RunCertificate:
    """A certificate for 127.0.0.1 and localhost signed by `ca` (None: a new CA), and the
    CA's, written under `directory`.

    Raises RuntimeError when trustme is not installed.
    """
    try:
        import trustme
    except ImportError:
        raise RuntimeError("--tls needs trustme: pip install '.[bench]'") from None
    directory.mkdir(parents=True, exist_ok=True)
    ca = ca or trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    cafile, certfile, keyfile = (directory / name for name in ("ca.pem", "cert.pem", "key.pem"))
    ca.cert_pem.write_to_path(str(cafile))
    server.private_key_pem.write_to_path(str(keyfile))
    for blob in server.cert_chain_pems:
        blob.write_to_path(str(certfile), append=True)
    return RunCertificate(str(cafile), str(certfile), str(keyfile))


@functools.cache
def client_context(cafile: str | None) -> ssl.SSLContext:
    """The context of a run's clients: trusting `cafile` alone, or (None) the system's CAs,
    as `broker.client` does by default, for the REST set-up and /metrics too.

    One per process and CA file: every client of a shard shares it. Raises
    OSError or ssl.SSLError for a file that is not there or holds no PEM CA.
    """
    if cafile is None:
        return ssl.create_default_context()
    return ssl.create_default_context(cafile=cafile)


def server_context(certfile: str, keyfile: str) -> ssl.SSLContext:
    """A server context with this chain and key (the echo server's).

    Raises OSError or ssl.SSLError for files that do not hold them.
    """
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certfile, keyfile)
    return context


def certificate_for(directory: Path, tls: bool) -> RunCertificate | None:
    """With `tls`, a new certificate under `directory` (make_certificate); else None."""
    return make_certificate(directory / "tls") if tls else None
