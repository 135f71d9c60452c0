"""Throw-away certificates for the TLS tests, made by the ``openssl`` command line.

``make_ca`` makes a CA; ``issue`` a server certificate it signs for loopback (``localhost``,
127.0.0.1, ::1) or other names; ``self_signed`` a certificate no CA vouches for. EC P-256 keys:
quick to make, so every test module can have its own (``rsa=True`` for an RSA 2048 server key,
where a test needs RSA key exchange offered).
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

LOOPBACK_NAMES = ("DNS:localhost", "IP:127.0.0.1", "IP:::1")


@dataclass(frozen=True)
class Pair:
    cert: Path
    key: Path


def _openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=30)


def _key(path: Path, rsa: bool = False) -> Path:
    if rsa:
        _openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", path)
    else:
        _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
                 "-out", path)
    return path


def make_ca(folder: Path, name: str = "test-ca") -> Pair:
    """A CA certificate and key (valid for a day)."""
    key = _key(folder / f"{name}.key")
    cert = folder / f"{name}.pem"
    _openssl("req", "-x509", "-new", "-key", key, "-out", cert, "-days", "1", "-subj",
             f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    return Pair(cert, key)


def issue(folder: Path, ca: Pair, name: str = "server",
          names: tuple[str, ...] = LOOPBACK_NAMES, rsa: bool = False) -> Pair:
    """A server certificate for ``names`` (subjectAltName entries), signed by ``ca``."""
    key = _key(folder / f"{name}.key", rsa)
    csr = folder / f"{name}.csr"
    cert = folder / f"{name}.pem"
    ext = folder / f"{name}.ext"
    ext.write_text(f"subjectAltName={','.join(names)}\nextendedKeyUsage=serverAuth\n"
                   "basicConstraints=CA:FALSE\n")
    _openssl("req", "-new", "-key", key, "-out", csr, "-subj", f"/CN={name}")
    _openssl("x509", "-req", "-in", csr, "-CA", ca.cert, "-CAkey", ca.key, "-CAcreateserial",
             "-out", cert, "-days", "1", "-extfile", ext)
    return Pair(cert, key)


def self_signed(folder: Path, name: str = "untrusted",
                names: tuple[str, ...] = LOOPBACK_NAMES) -> Pair:
    """A certificate for loopback that no CA signed."""
    key = _key(folder / f"{name}.key")
    cert = folder / f"{name}.pem"
    _openssl("req", "-x509", "-new", "-key", key, "-out", cert, "-days", "1", "-subj",
             f"/CN={name}", "-addext", f"subjectAltName={','.join(names)}")
    return Pair(cert, key)
