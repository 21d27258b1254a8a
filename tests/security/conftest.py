"""Fixtures for the security tests: dev PKIs made by `lmps certs`' own code."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from lmps.client.certs import DevPki, make_dev_pki
from lmps.rpc import security


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DevPki:
    """The cluster's CA, server and client certificates and token."""
    return make_dev_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def stranger_pki(tmp_path_factory: pytest.TempPathFactory) -> DevPki:
    """Certificates from another CA: valid-looking, but not trusted by the cluster."""
    return make_dev_pki(tmp_path_factory.mktemp("stranger"), ca_name="stranger CA")


@pytest.fixture(autouse=True)
def _no_flag_overrides() -> Iterator[None]:
    """Flag overrides are process-wide: never let one leak into another test."""
    security.clear_settings()
    yield
    security.clear_settings()
