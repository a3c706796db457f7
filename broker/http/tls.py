"""TLS on the daemon's own port: the files checked at start, then handed to hypercorn.

Hypercorn reads the certificate and key only once it binds, inside the
server's nurseries, and OpenSSL's own message ("PEM lib") names no file.
`check_tls` reads them first, the way hypercorn will, so a bad file stops
the daemon before it opens the database, with one line that names the file
and the setting (`broker serve` exits 2). Hypercorn then gets the paths, not
a context: a gateway process builds its own from the same settings.

HTTP/2 is not offered over TLS (ALPN `http/1.1` only): the gateway's
WebSocket paths (frame-size refusal, batched writes) and the unread-body
keep-alive rule are built and tested on HTTP/1.1, the same protocol as the
plain port.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from hypercorn.config import Config as HypercornConfig

from broker.config import ConfigError, TlsSettings


def check_tls(tls: TlsSettings) -> None:
    """Load the certificate chain, its key and the client CA as the server will.

    Raises ConfigError naming the setting and the file: missing or
    unreadable, not a PEM certificate (chain, client CA), not a PEM private
    key, an encrypted key, or a key that does not match the certificate.
    """
    if not tls.enabled:
        return
    assert tls.certfile is not None and tls.keyfile is not None
    files = {"certfile": tls.certfile, "keyfile": tls.keyfile}
    if tls.client_cafile:
        files["client_cafile"] = tls.client_cafile
    for name, path in files.items():
        try:
            Path(path).read_bytes()
        except OSError as exc:
            raise ConfigError(f"http.tls.{name} {path}: cannot read: "
                              f"{exc.strerror or exc}") from None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    for name, path in files.items():
        if name == "keyfile":
            continue
        try:
            context.load_verify_locations(cafile=path)
        except ssl.SSLError:
            raise ConfigError(f"http.tls.{name} {path}: holds no PEM certificate") from None

    def encrypted() -> bytes:
        # Without a callback OpenSSL would ask for a passphrase on the terminal.
        raise ConfigError(f"http.tls.keyfile {tls.keyfile}: the key is encrypted; give an"
                          " unencrypted key readable only by the daemon")

    try:
        context.load_cert_chain(tls.certfile, tls.keyfile, password=encrypted)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise ConfigError(f"http.tls.keyfile {tls.keyfile}: does not match the"
                              f" certificate in {tls.certfile}") from None
        raise ConfigError(f"http.tls.keyfile {tls.keyfile}: not a PEM private key"
                          f" ({exc.reason or exc})") from None


def configure_tls(config: HypercornConfig, tls: TlsSettings) -> None:
    """Serve TLS on `config`'s binds when `tls` is enabled (checked by `check_tls`)."""
    if not tls.enabled:
        return
    config.certfile = tls.certfile
    config.keyfile = tls.keyfile
    config.alpn_protocols = ["http/1.1"]
    if tls.client_cafile:
        config.ca_certs = tls.client_cafile
        config.verify_mode = ssl.CERT_REQUIRED
