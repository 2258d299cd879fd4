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
