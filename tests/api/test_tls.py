"""TLS from config, and client-certificate auth when client_ca is set (certs made here with openssl)."""
import subprocess

import pytest
import requests

from testbed.agentproc import AgentProcess

EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


def _openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", *EC, "-keyout", "ca.key", "-out", "ca.crt", "-days", "1", "-subj", "/CN=test-ca", cwd=d)
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    for name in ("server", "client"):
        _openssl("req", *EC, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.crt", "-days", "1", "-extfile", "san.ext", cwd=d)
    return d


def test_tls_with_client_certificates(tmp_path, pki):
    tls = (f'tls_cert = "{pki / "server.crt"}"\ntls_key = "{pki / "server.key"}"\n'
           f'client_ca = "{pki / "ca.crt"}"\n')
    agent = AgentProcess(tmp_path / "a", scheme="https", tls_extra=tls)
    token = agent.token("admin", "admin")
    client = (str(pki / "client.crt"), str(pki / "client.key"))
    agent.start(verify=str(pki / "ca.crt"), cert=client)
    try:
        auth = {"Authorization": f"Bearer {token}"}
        r = requests.get(agent.url + "/v1/host", headers=auth, verify=str(pki / "ca.crt"), cert=client, timeout=10)
        assert r.status_code == 200 and r.json()["hostname"]
        with pytest.raises(requests.exceptions.SSLError):  # no client certificate: refused in the handshake
            requests.get(agent.url + "/v1/health", verify=str(pki / "ca.crt"), timeout=10)
        with pytest.raises(requests.exceptions.ConnectionError):  # plain HTTP on a TLS port
            requests.get(agent.url.replace("https", "http") + "/v1/health", timeout=10)
        # the CLI speaks TLS too, from the client config file
        (tmp_path / "client.toml").write_text(
            f'url = "{agent.url}"\ntoken = "{token}"\nca = "{pki / "ca.crt"}"\n'
            f'cert = "{client[0]}"\nkey = "{client[1]}"\n')
        out = agent.cli("host", "--json", env={"NODEAGENT_CLIENT_CONFIG": str(tmp_path / "client.toml")},
                        check=False)
        assert out.returncode == 0, out.stderr
        assert '"hostname"' in out.stdout
    finally:
        assert agent.stop() == 0


def _client_cert(pki, name: str, subject: str, san: str | None = None) -> tuple[str, str]:
    ext = pki / f"{name}.ext"
    ext.write_text(f"subjectAltName={san}\n" if san else "basicConstraints=CA:FALSE\n")
    _openssl("req", *EC, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject, cwd=pki)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", f"{name}.crt", "-days", "1", "-extfile", str(ext), cwd=pki)
    return str(pki / f"{name}.crt"), str(pki / f"{name}.key")


def test_client_certificates_map_to_roles(tmp_path, pki):
    """[api] cert_roles maps a certificate's CN or SAN DNS name to a role, used when no bearer
    token is sent: an admin, a reader, a peer (named after its configured peer), a stranger."""
    from agent.migration.peer import PeerClient
    from tests.api.conftest import assert_error

    cp = _client_cert(pki, "cp", "/CN=cp.example")
    watcher = _client_cert(pki, "watcher", "/O=ops/CN=watcher")
    peer = _client_cert(pki, "host2", "/CN=node-17.example", "DNS:host2,DNS:host2.example")
    rogue = _client_cert(pki, "rogue", "/CN=rogue")  # mapped to peer, but no such peer is configured
    stranger = _client_cert(pki, "stranger", "/CN=stranger")
    tls = (f'tls_cert = "{pki / "server.crt"}"\ntls_key = "{pki / "server.key"}"\nclient_ca = "{pki / "ca.crt"}"\n'
           'cert_roles = { "cp.example" = "admin", "watcher" = "reader", "host2" = "peer", "rogue" = "peer" }\n')
    agent = AgentProcess(tmp_path / "a", scheme="https", tls_extra=tls,
                         extra_config='[peers.host2]\nurl = "https://127.0.0.1:9"\n')
    token = agent.token("admin", "admin")
    ca = str(pki / "ca.crt")
    agent.start(verify=ca, cert=cp)

    def call(method, path, cert, **kw):
        return requests.request(method, agent.url + path, verify=ca, cert=cert, timeout=10, **kw)
    try:
        assert call("GET", "/v1/host", cp).status_code == 200
        r = call("POST", "/v1/tokens", cp, json={"name": "made-by-cert", "role": "reader"})
        assert r.status_code == 201, r.text
        assert call("GET", "/v1/host", watcher).status_code == 200
        err = assert_error(call("POST", "/v1/tokens", watcher, json={"name": "w", "role": "reader"}), 403)
        assert "certificate 'watcher'" in err["message"]
        err = assert_error(call("GET", "/v1/host", stranger), 401)
        assert "stranger" in err["message"] and "cert_roles" in err["message"]
        # a bearer token wins over the certificate
        assert call("GET", "/v1/host", stranger, headers={"Authorization": f"Bearer {token}"}).status_code == 200
        # the peer: its SAN names it host2, a configured peer; it reaches the peer routes only
        assert_error(call("GET", "/v1/host", peer), 403)
        inst = "0" * 32
        assert call("DELETE", f"/v1/peer/migrations/{inst}", peer).json() == {"deleted": False}
        assert_error(call("DELETE", f"/v1/peer/migrations/{inst}", rogue), 403)
        # what a source agent uses: its [peers.<dest>] ca, cert, key; its calls carry the request id
        # of the migration's request, so both hosts' logs name it
        from agent import log as agent_log
        with agent_log.bind(request_id="migration-req-1"):
            client = PeerClient("dest", agent.url, None, ca=ca, cert=peer[0], key=peer[1])
        assert client.alive() and client.abort(inst) is False
        log = agent.log.read_text()
        assert "caller=cp.example role=admin auth=certificate" in log
        assert "caller=host2 role=peer auth=certificate request_id=migration-req-1" in log
    finally:
        assert agent.stop() == 0
