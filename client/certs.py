"""`lmps certs`: a development CA, a server certificate, a client certificate and a token.

Not for production PKI: keys are ECDSA P-256 written unencrypted (mode 0600). The server
certificate is used by every lmps service both to listen and to dial its peers (it carries
serverAuth and clientAuth); the client certificate is for people running `lmps` commands.
Its names (SANs): localhost, 127.0.0.1, ::1, `SERVER_NAME` ("lmps") and any `--hosts`.
Members dial each other by IP, so in a cluster whose IPs are not known in advance set
LMPS_TLS_SERVER_NAME=lmps on every process: each peer is then verified against that name.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SERVER_NAME = "lmps"
DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class DevPki:
    """Paths of what `make_dev_pki` wrote."""

    ca: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    token: Path


def _san(hosts: list[str]) -> list[Any]:
    from cryptography import x509

    names: list[Any] = []
    for host in dict.fromkeys(hosts):  # dedupe, keep order
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def _key() -> Any:
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _builder(subject: str, issuer: Any, public_key: Any, days: int) -> Any:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
    )


def make_ca(common_name: str = "lmps dev CA", days: int = 365) -> tuple[Any, Any]:
    """A self-signed CA: (private key, certificate)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    key = _key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    cert = (
        _builder(common_name, name, key.public_key(), days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def issue(
    ca_key: Any,
    ca_cert: Any,
    common_name: str,
    *,
    hosts: list[str],
    server: bool,
    days: int = 365,
) -> tuple[Any, Any]:
    """A leaf certificate signed by the CA: (private key, certificate).

    `server`: serverAuth + clientAuth with `hosts` as SANs; otherwise clientAuth only.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID

    key = _key()
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if server:
        usages.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)
    builder = (
        _builder(common_name, ca_cert.subject, key.public_key(), days)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
    )
    if hosts:
        builder = builder.add_extension(x509.SubjectAlternativeName(_san(hosts)), False)
    return key, builder.sign(ca_key, hashes.SHA256())


def _write(path: Path, data: bytes, private: bool) -> None:
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def pem_cert(cert: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    data: bytes = cert.public_bytes(serialization.Encoding.PEM)
    return data


def pem_key(key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    data: bytes = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return data


def make_dev_pki(
    out: Path,
    hosts: list[str] | None = None,
    *,
    days: int = 365,
    force: bool = False,
    ca_name: str = "lmps dev CA",
) -> DevPki:
    """Write ca.pem, server.pem, client.pem (+ keys) and a random token into `out`."""
    pki = DevPki(
        ca=out / "ca.pem",
        ca_key=out / "ca-key.pem",
        server_cert=out / "server.pem",
        server_key=out / "server-key.pem",
        client_cert=out / "client.pem",
        client_key=out / "client-key.pem",
        token=out / "token",
    )
    existing = [p for p in vars(pki).values() if p.exists()]
    if existing and not force:
        raise FileExistsError(f"{existing[0]} exists; pass --force to replace the files in {out}")
    out.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = make_ca(ca_name, days)
    names = [*DEFAULT_HOSTS, SERVER_NAME, *(hosts or [])]
    server_key, server_cert = issue(
        ca_key, ca_cert, "lmps server", hosts=names, server=True, days=days
    )
    client_key, client_cert = issue(
        ca_key, ca_cert, "lmps client", hosts=[], server=False, days=days
    )
    _write(pki.ca, pem_cert(ca_cert), private=False)
    _write(pki.ca_key, pem_key(ca_key), private=True)
    _write(pki.server_cert, pem_cert(server_cert), private=False)
    _write(pki.server_key, pem_key(server_key), private=True)
    _write(pki.client_cert, pem_cert(client_cert), private=False)
    _write(pki.client_key, pem_key(client_key), private=True)
    _write(pki.token, (secrets.token_urlsafe(32) + "\n").encode(), private=True)
    return pki


def usage(pki: DevPki) -> str:
    """How to turn TLS, mutual TLS and the token on with these files."""
    d = pki.ca.parent.resolve()
    return f"""\
Wrote a dev CA, server and client certificates and a token to {d}
(server names: {", ".join([*DEFAULT_HOSTS, SERVER_NAME])} and any --hosts).

Every lmps service (and `lmps cluster up`, whose processes inherit the environment):
  export LMPS_TLS_CERT={d / "server.pem"} LMPS_TLS_KEY={d / "server-key.pem"}
  export LMPS_TLS_CA={d / "ca.pem"} LMPS_TLS_CLIENT_AUTH=require
  export LMPS_AUTH_TOKEN_FILE={d / "token"}
  export LMPS_TLS_SERVER_NAME={SERVER_NAME}   # members dial IPs: verify this name instead

A client (`lmps train`, `lmps status`, ...) on another machine needs only:
  export LMPS_TLS_CA={d / "ca.pem"} LMPS_TLS_SERVER_NAME={SERVER_NAME}
  export LMPS_TLS_CLIENT_CERT={d / "client.pem"} LMPS_TLS_CLIENT_KEY={d / "client-key.pem"}
  export LMPS_AUTH_TOKEN_FILE={d / "token"}

grpcurl:
  grpcurl -cacert {d / "ca.pem"} -cert {d / "client.pem"} -key {d / "client-key.pem"} \\
    -servername {SERVER_NAME} -H "authorization: Bearer $(cat {d / "token"})" \\
    127.0.0.1:50051 list

Keep ca-key.pem offline (it signs new certificates); the rest is what services mount.
See docs/security.md for docker compose and Kubernetes."""
