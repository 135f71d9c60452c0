"""TLS contexts: terminating clients on ``listen``, and speaking TLS to ``https://`` backends.

Built once per config, never per connection. Policy, in one place so both sides agree:

- a TLS 1.2 floor (1.0 and 1.1 are refused in the handshake: RFC 8996 deprecates them) and
  OpenSSL's defaults above it, minus the suites without forward secrecy or AEAD: on TLS 1.2
  only ECDHE/DHE key exchange with AES-GCM or ChaCha20-Poly1305 (TLS 1.3 suites are AEAD
  already and are left as OpenSSL orders them);
- no compression (CRIME), no session tickets on the server side (a ticket key that never
  rotates would undo forward secrecy), the server's cipher order;
- to backends, the certificate is verified against the system's CAs, or a CA file given for
  the pool, and its name checked — unless the config says ``verify: false``, which is logged
  loudly every time a context is built from it.

``check_server_pair`` is what the config loader calls: a missing or unreadable file, or a key
that does not belong to its certificate, becomes one line naming the file.
"""

from __future__ import annotations

import logging
import os
import ssl
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from balancer.config import BackendConfig, BackendTlsConfig

__all__ = ["CIPHERS_TLS12", "TlsError", "backend_context", "check_ca_file", "check_server_pair",
           "client_context", "connect_options", "reload_server_context", "server_context"]

log = logging.getLogger("balancer.tls")

#: TLS 1.2 suites we accept: forward secret key exchange, AEAD ciphers only.
CIPHERS_TLS12 = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL:!eNULL:!MD5:!DSS"


class TlsError(ValueError):
    """A certificate, key or CA file that cannot be used; the message is one line."""


def _harden(ctx: ssl.SSLContext) -> ssl.SSLContext:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(CIPHERS_TLS12)
    ctx.options |= ssl.OP_NO_COMPRESSION
    return ctx


def server_context(cert: str, key: str) -> ssl.SSLContext:
    """The context ``listen`` terminates TLS with; raises TlsError naming the bad file."""
    ctx = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_TICKET
    ctx.set_alpn_protocols(["http/1.1"])  # we speak HTTP/1.1 only: never let a client pick h2
    _load_pair(ctx, cert, key)
    return ctx


def reload_server_context(ctx: ssl.SSLContext, cert: str, key: str) -> None:
    """Load a renewed certificate into the live context: new handshakes use it, no restart.

    Checked on a scratch context first, so a bad pair leaves the live one untouched.
    """
    _load_pair(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), cert, key)
    _load_pair(ctx, cert, key)


def check_server_pair(cert: str, key: str) -> None:
    """Raise TlsError (one line) unless ``cert`` and ``key`` load as a matching pair."""
    server_context(cert, key)


def _load_pair(ctx: ssl.SSLContext, cert: str, key: str) -> None:
    for path, what, marker in ((cert, "certificate", b"-----BEGIN CERTIFICATE-----"),
                               (key, "private key", b"PRIVATE KEY-----")):
        try:
            with open(path, "rb") as f:
                text = f.read(1 << 20)
        except OSError as exc:
            raise TlsError(f"cannot read the {what} {path}: {exc.strerror or exc}") from None
        if marker not in text:
            raise TlsError(f"{path} holds no PEM {what}")
    try:
        # A passphrase-protected key would make OpenSSL prompt on the terminal: refuse instead.
        ctx.load_cert_chain(cert, key, password=_no_password)
    except ssl.SSLError as exc:
        reason = exc.reason or str(exc)
        if "KEY_VALUES_MISMATCH" in reason:
            raise TlsError(f"the private key {key} does not belong to the certificate "
                           f"{cert}") from None
        raise TlsError(f"cannot load the certificate {cert} with the key {key}: "
                       f"{_reason(exc)}") from None
    except _Encrypted:
        raise TlsError(f"the private key {key} is encrypted: give an unencrypted key "
                       f"(readable by this user only)") from None


class _Encrypted(Exception):
    pass


def _no_password() -> bytes:
    raise _Encrypted


def check_ca_file(path: str) -> None:
    """Raise TlsError (one line) unless ``path`` holds at least one CA certificate."""
    client_context(ca=path)


def client_context(ca: str | None = None, verify: bool = True,
                   label: str = "") -> ssl.SSLContext:
    """The context for connections to ``https://`` backends.

    ``ca``: a PEM file of CA certificates to trust instead of the system's. ``verify=False``
    accepts any certificate (for a lab, never silently: logged as a warning naming ``label``).
    """
    ctx = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    ctx.set_alpn_protocols(["http/1.1"])
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        log.warning("TLS to backends%s is NOT verified (verify: false): anyone on the path "
                    "can read and change that traffic", f" of {label}" if label else "")
        return ctx
    if ca is None:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
        return ctx
    try:
        ctx.load_verify_locations(cafile=ca)
    except OSError as exc:
        if isinstance(exc, ssl.SSLError):
            raise TlsError(f"cannot load CA certificates from {ca}: {_reason(exc)}") from None
        raise TlsError(f"cannot read the CA file {ca}: {exc.strerror or exc}") from None
    if not ctx.get_ca_certs():
        raise TlsError(f"the CA file {ca} holds no CA certificate")
    return ctx


def _reason(exc: ssl.SSLError) -> str:
    """OpenSSL's reason in words (``no certificate or crl found``), not its error tuple."""
    reason = exc.reason or ""
    if reason:
        return reason.replace("_", " ").lower()
    return str(exc.args[1] if len(exc.args) > 1 else exc)


_backend_contexts: dict[tuple[BackendTlsConfig, tuple[int, int, int] | None],
                        ssl.SSLContext] = {}


def _stamp(path: str | None) -> tuple[int, int, int] | None:
    """Which version of a CA file this is (inode, size, mtime): a CA bundle renewed in place
    under the same name is a new setting, loaded on the next reload."""
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def backend_context(tls: BackendTlsConfig, label: str = "") -> ssl.SSLContext:
    """One client context per distinct ``backend_tls`` and version of its CA file (shared by
    the backends that use it: OpenSSL loads a CA bundle once, and sessions can be resumed
    across them)."""
    key = (tls, _stamp(tls.ca))
    ctx = _backend_contexts.get(key)
    if ctx is None:
        ctx = client_context(tls.ca, tls.verify, label)
        if len(_backend_contexts) > 256:  # configs come and go on reloads
            _backend_contexts.clear()
        _backend_contexts[key] = ctx
    return ctx


def connect_options(backend: BackendConfig) -> dict[str, Any]:
    """What ``loop.create_connection`` needs to reach ``backend``: nothing for ``http://``;
    for ``https://`` the SSLContext and the name to send (SNI) and verify."""
    if backend.scheme != "https":
        return {}
    tls = backend.tls
    return {"ssl": backend_context(tls, f"{backend.url} ({backend.name})"),
            "server_hostname": tls.server_name or backend.host}
