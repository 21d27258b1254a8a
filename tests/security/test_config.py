"""Settings from env and flags, `lmps certs` output, and the guard's bookkeeping."""

from __future__ import annotations

import argparse
import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from lmps.client.certs import DevPki, make_dev_pki
from lmps.client.cli import main as lmps_main
from lmps.rpc import security
from lmps.rpc.flags import add_serve_flags, serve_options
from lmps.rpc.guard import PeerSlots, peer_host


def test_defaults_are_plaintext_without_token_and_keep_256_mib() -> None:
    sec = security.load({})
    assert not sec.tls.serving and not sec.tls.dialing and sec.token == ""
    assert sec.limits.max_message_bytes == 256 * 1024 * 1024
    assert sec.limits.max_stream_messages == 100_000
    assert sec.limits.max_streams_per_peer == 32


def test_every_setting_reads_its_env_variable(pki: DevPki) -> None:
    sec = security.load(
        {
            "LMPS_TLS_CERT": "s.pem",
            "LMPS_TLS_KEY": "s.key",
            "LMPS_TLS_CA": "ca.pem",
            "LMPS_TLS_CLIENT_AUTH": "REQUIRE",
            "LMPS_TLS_CLIENT_CERT": "c.pem",
            "LMPS_TLS_CLIENT_KEY": "c.key",
            "LMPS_TLS_SERVER_NAME": "lmps",
            "LMPS_AUTH_TOKEN_FILE": str(pki.token),
            "LMPS_MAX_MESSAGE_MB": "64",
            "LMPS_MAX_STREAM_MESSAGES": "10",
            "LMPS_MAX_STREAMS_PER_PEER": "0",
        }
    )
    assert sec.tls == security.Tls("s.pem", "s.key", "ca.pem", "require", "c.pem", "c.key", "lmps")
    assert sec.token == pki.token.read_text().strip() and len(sec.token) >= 40
    assert sec.limits == security.Limits(64 * 1024 * 1024, 10, 0)
    assert sec.token not in repr(sec)  # never logged


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"LMPS_TLS_CERT": "a.pem"}, "both a certificate and its key"),
        ({"LMPS_TLS_CLIENT_AUTH": "require"}, "needs a CA"),
        ({"LMPS_TLS_CLIENT_AUTH": "optional"}, "must be one of"),
        ({"LMPS_AUTH_TOKEN": "a", "LMPS_AUTH_TOKEN_FILE": "f"}, "not both"),
        ({"LMPS_AUTH_TOKEN": "two words\n"}, "whitespace"),
        ({"LMPS_MAX_STREAM_MESSAGES": "many"}, "must be an integer"),
        ({"LMPS_MAX_MESSAGE_MB": "1"}, ">= 4 MiB"),
    ],
)
def test_bad_settings_are_refused_with_a_reason(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        security.load(env)


def test_token_from_a_secret_loses_its_trailing_newline() -> None:
    assert security.load({"LMPS_AUTH_TOKEN": "abc123\n"}).token == "abc123"


def test_service_flags_override_env_for_the_whole_process(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LMPS_AUTH_TOKEN", "from-env")
    monkeypatch.setenv("LMPS_MAX_STREAMS_PER_PEER", "7")
    parser = argparse.ArgumentParser()
    add_serve_flags(parser, port=1, metrics_port=-1, member=True)
    args = parser.parse_args(["--auth-token", "from-flag", "--health-port", "0"])
    opts = serve_options(args)
    assert opts.health_port == 0
    assert opts.security is not None and opts.security.token == "from-flag"
    assert opts.security.limits.max_streams_per_peer == 7  # no flag: the env's value
    # The channels this process opens (membership, fan-out) see the flag too.
    assert security.load().token == "from-flag"


def _sans(path: Path) -> tuple[set[str], set[str]]:
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    dns = set(san.get_values_for_type(x509.DNSName))
    ips = {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
    return dns, ips


def _usages(path: Path) -> set[object]:
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    return set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def test_certs_names_usages_and_key_modes(tmp_path: Path) -> None:
    pki = make_dev_pki(tmp_path, ["ps-0.lmps.svc", "10.0.0.7"])
    dns, ips = _sans(pki.server_cert)
    assert dns == {"localhost", "lmps", "ps-0.lmps.svc"}
    assert ips == {"127.0.0.1", str(ipaddress.ip_address("::1")), "10.0.0.7"}
    assert _usages(pki.server_cert) == {
        ExtendedKeyUsageOID.SERVER_AUTH,
        ExtendedKeyUsageOID.CLIENT_AUTH,
    }
    assert _usages(pki.client_cert) == {ExtendedKeyUsageOID.CLIENT_AUTH}
    ca = x509.load_pem_x509_certificate(pki.ca.read_bytes())
    leaf = x509.load_pem_x509_certificate(pki.server_cert.read_bytes())
    leaf.verify_directly_issued_by(ca)
    for secret in (pki.ca_key, pki.server_key, pki.client_key, pki.token):
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600, secret
    with pytest.raises(FileExistsError):
        make_dev_pki(tmp_path)
    old_token = pki.token.read_text()
    assert make_dev_pki(tmp_path, force=True).token.read_text() != old_token


def test_lmps_certs_command_writes_files_and_prints_usage(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "certs"
    assert lmps_main(["certs", "--out", str(out), "--hosts", "coordinator"]) == 0
    printed = capsys.readouterr().out
    assert f"LMPS_TLS_CA={out.resolve() / 'ca.pem'}" in printed
    assert "LMPS_AUTH_TOKEN_FILE" in printed and "LMPS_TLS_CLIENT_AUTH=require" in printed
    assert "coordinator" in _sans(out / "server.pem")[0]
    assert lmps_main(["certs", "--out", str(out)]) == 1  # no silent overwrite


@pytest.mark.parametrize(
    ("peer", "host"),
    [
        ("ipv4:10.0.0.7:51234", "10.0.0.7"),
        ("ipv6:[::1]:51234", "::1"),
        ("unix:/tmp/sock", "unix:/tmp/sock"),
    ],
)
def test_peer_host(peer: str, host: str) -> None:
    assert peer_host(peer) == host


def test_peer_slots_count_per_host_and_release_once() -> None:
    slots = PeerSlots(2)
    a1, a2 = slots.acquire("a"), slots.acquire("a")
    assert a1 and a2 and slots.acquire("a") is None
    assert slots.acquire("b") is not None  # other hosts have their own budget
    a1()
    a1()  # idempotent: the handler and the termination callback both release
    assert slots.in_flight("a") == 1
    assert slots.acquire("a") is not None
    assert PeerSlots(0).acquire("x") is not None  # 0 = unlimited
