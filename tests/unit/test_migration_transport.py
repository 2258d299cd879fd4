"""How the source reaches a destination's hypervisor: TLS when configured, and a peer's
answer cannot downgrade it (agent/migration/transport.py, [migration] in agent/config.py)."""
from __future__ import annotations

import pytest

from agent.config import Config, MigrationConfig
from agent.errors import Unavailable, Unprocessable
from agent.migration import transport


@pytest.fixture
def pki(tmp_path):
    for n in ("cacert.pem", "clientcert.pem", "clientkey.pem"):
        (tmp_path / n).write_text("x")
    return tmp_path


def test_tls_is_on_when_the_client_files_exist_unless_configured(pki, tmp_path):
    assert MigrationConfig(pki_path=str(pki)).tls_enabled
    assert not MigrationConfig(pki_path=str(pki), tls=False).tls_enabled
    assert not MigrationConfig(pki_path=str(tmp_path / "none")).tls_enabled
    assert MigrationConfig(pki_path=str(tmp_path / "none"), tls=True).tls_enabled
    assert MigrationConfig().client_files() == ["/etc/pki/CA/cacert.pem", "/etc/pki/libvirt/clientcert.pem",
                                                "/etc/pki/libvirt/private/clientkey.pem"]


def test_with_tls_the_source_adds_its_own_pkipath_and_asks_qemu_for_tls(pki):
    r = transport.route("qemu+tls://198.18.0.2/system", MigrationConfig(pki_path=str(pki)), "h2")
    assert r == transport.Route(f"qemu+tls://198.18.0.2/system?pkipath={pki}", True)
    assert transport.scheme(MigrationConfig(pki_path=str(pki))) == "qemu+tls"


@pytest.mark.parametrize("answer", ["qemu+tcp://198.18.0.2/system", "fake://h2"])
def test_a_peer_cannot_downgrade_a_tls_host_to_cleartext(pki, answer):
    cfg = MigrationConfig(pki_path=str(pki))
    if answer.startswith("qemu+"):
        with pytest.raises(Unprocessable, match="only over TLS"):
            transport.route(answer, cfg, "h2")
    else:  # another driver's URI: no libvirt transport at all (the fake driver's hosts)
        assert transport.route(answer, cfg, "h2") == transport.Route(answer, False)


def test_tls_on_without_the_files_says_what_is_missing(tmp_path):
    with pytest.raises(Unavailable, match="clientcert.pem"):
        transport.route("qemu+tls://h2/system", MigrationConfig(tls=True, pki_path=str(tmp_path)), "h2")


def test_without_tls_a_plain_answer_is_used_as_is(tmp_path):
    cfg = MigrationConfig(pki_path=str(tmp_path))
    assert transport.route("qemu+tcp://h2/system", cfg, "h2") == transport.Route("qemu+tcp://h2/system", False)
    assert transport.scheme(cfg) == "qemu+tcp"


@pytest.mark.parametrize("path", ["relative/pki", "/etc/pki?x=1", "/etc/pki&no_verify=1", "/etc/my pki"])
def test_pki_path_must_be_a_plain_absolute_path(path):
    with pytest.raises(ValueError, match="pki_path"):
        MigrationConfig(pki_path=path)


def test_a_plain_migration_uri_with_tls_on_is_a_config_error():
    with pytest.raises(ValueError, match="not qemu\\+tls"):
        Config.model_validate({"hypervisor": {"migration_uri": "qemu+tcp://h/system"}, "migration": {"tls": True}})
