"""Certificates for TLS tests: a private CA made by the test (trustme), a server
certificate for 127.0.0.1 in PEM files, and client contexts that trust the CA."""

from __future__ import annotations

import ssl
from pathlib import Path

import msgspec
import trustme

from broker.config import Settings, TlsSettings
from broker.loadtest.tls import make_certificate


class Certificates(msgspec.Struct, frozen=True):
    """PEM files in a directory: the CA (`cafile`), the server's chain and key."""

    ca: trustme.CA
    cafile: Path
    certfile: Path
    keyfile: Path

    def settings(self, client_cafile: Path | None = None) -> TlsSettings:
        return TlsSettings(certfile=str(self.certfile), keyfile=str(self.keyfile),
                           client_cafile=None if client_cafile is None else str(client_cafile))

    def client_context(self) -> ssl.SSLContext:
        """A client context that trusts the CA (and checks the host name)."""
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        return context


def serving_tls(settings: Settings, certs: Certificates) -> Settings:
    """`settings` with the daemon serving TLS with `certs`."""
    return msgspec.structs.replace(
        settings, http=msgspec.structs.replace(settings.http, tls=certs.settings()))


def make_certificates(directory: Path) -> Certificates:
    """A new CA and a certificate for 127.0.0.1 and localhost, written under `directory`
    (as `broker loadtest --tls` makes them)."""
    ca = trustme.CA()
    made = make_certificate(directory, ca)
    return Certificates(ca, Path(made.cafile), Path(made.certfile), Path(made.keyfile))
