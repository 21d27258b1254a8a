"""Security test helpers: the configurations a secured cluster and its clients use."""

from __future__ import annotations

from pathlib import Path

from lmps.client.certs import DevPki
from lmps.rpc import security


def server_security(pki: DevPki, **limits: int) -> security.Security:
    """What every member of a secured cluster runs with: mutual TLS and the token."""
    return security.Security(
        tls=security.Tls(
            cert=str(pki.server_cert),
            key=str(pki.server_key),
            ca=str(pki.ca),
            client_auth="require",
        ),
        token=token_of(pki),
        limits=security.Limits(**limits),
    )


def client_security(
    pki: DevPki, *, token: str | None = None, cert: bool = True, ca: Path | None = None
) -> security.Security:
    """A client of the cluster: its CA, optionally a client certificate and a token."""
    return security.Security(
        tls=security.Tls(
            ca=str(ca or pki.ca),
            client_cert=str(pki.client_cert) if cert else "",
            client_key=str(pki.client_key) if cert else "",
        ),
        token=token_of(pki) if token is None else token,
    )


def token_of(pki: DevPki) -> str:
    return pki.token.read_text().strip()


def cluster_env(pki: DevPki) -> dict[str, str]:
    """The LMPS_* variables that turn mutual TLS and the token on for a whole cluster."""
    return {
        "LMPS_TLS_CERT": str(pki.server_cert),
        "LMPS_TLS_KEY": str(pki.server_key),
        "LMPS_TLS_CA": str(pki.ca),
        "LMPS_TLS_CLIENT_AUTH": "require",
        "LMPS_TLS_SERVER_NAME": "lmps",
        "LMPS_AUTH_TOKEN_FILE": str(pki.token),
    }
