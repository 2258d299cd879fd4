"""The Ansible role end to end on this host.

``ansible-playbook -i localhost, -c local ansible/site.yml`` with every path in a temp dir
and a free 127.0.0.1 port brings up a working agent (a plain daemon: no systemd here) that
answers an authenticated call; a second run changes nothing; ansible-lint passes; bad
variables fail before anything on the host changes. The agent is stopped by the PID in its
pidfile and everything the playbook made is removed at the end.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

from testbed.agentproc import drop_host_filter

ROOT = Path(__file__).resolve().parents[2]
ANSIBLE_DIR = ROOT / "ansible"
BIN = Path(sys.executable).parent
PLAYBOOK_TIMEOUT = 600  # seconds: a first run installs the agent into a fresh venv
STOP_TIMEOUT = 30  # seconds for the agent to exit after SIGTERM

pytestmark = [pytest.mark.real, pytest.mark.slow]


def _tool(name: str) -> str:
    path = BIN / name
    if not path.exists():
        pytest.fail(f"{name} is missing from {BIN}: pip install -e '.[test]' (pinned in pyproject.toml)")
    return str(path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(home: Path) -> dict:
    return dict(os.environ, ANSIBLE_CONFIG=str(ANSIBLE_DIR / "ansible.cfg"), ANSIBLE_HOME=str(home),
                ANSIBLE_LOCAL_TEMP=str(home / "tmp"), ANSIBLE_REMOTE_TEMP=str(home / "remote-tmp"),
                ANSIBLE_NOCOLOR="1", ANSIBLE_FORCE_COLOR="0",
                PATH=f"{BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}")


def _playbook(env: dict, extra_vars: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [_tool("ansible-playbook"), "-i", "localhost,", "-c", "local", "ansible/site.yml",
         "-e", json.dumps(extra_vars), *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=PLAYBOOK_TIMEOUT)


def _recap(run: subprocess.CompletedProcess) -> dict[str, int]:
    """The PLAY RECAP line of localhost as {"ok": n, "changed": n, "failed": n, ...}."""
    m = re.search(r"^localhost\s*:\s*(.+)$", run.stdout, re.M)
    assert m, f"no PLAY RECAP in the output:\n{run.stdout[-3000:]}\n{run.stderr[-2000:]}"
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", m.group(1))}


def _explain(run: subprocess.CompletedProcess) -> str:
    return f"rc={run.returncode}\n{run.stdout[-6000:]}\n{run.stderr[-3000:]}"


def _changed_tasks(run: subprocess.CompletedProcess) -> list[str]:
    """Names of the tasks that reported changed (to say what broke idempotence)."""
    names, current = [], None
    for line in run.stdout.splitlines():
        m = re.match(r"^(?:TASK|RUNNING HANDLER) \[(?:\w+ : )?(.+?)\]", line)
        if m:
            current = m.group(1)
        elif line.startswith("changed:") and current:
            names.append(current)
    return names


def _get(url: str, ca: Path, token: str | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    ctx = ssl.create_default_context(cafile=str(ca))
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=30) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()


def _stop_agent(pidfile: Path, config: Path) -> None:
    """Stop the agent the playbook started, by the PID in its pidfile (if it still is ours)."""
    if not pidfile.exists():
        return
    pid = int(pidfile.read_text().strip())
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return
    if str(config) not in cmdline:
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT
    while _pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _pid_alive(pid):
        os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    """One provisioned agent for the module: the first playbook run and its paths."""
    base = tmp_path_factory.mktemp("ansible")
    port = _free_port()
    extra = {
        "nodeagent_listen": f"127.0.0.1:{port}",
        "nodeagent_prefix": str(base / "opt"),
        "nodeagent_config_dir": str(base / "etc"),
        "nodeagent_state_dir": str(base / "state"),
        "nodeagent_run_dir": str(base / "run"),
        "nodeagent_log_dir": str(base / "log"),
        "nodeagent_service_mode": "daemon",  # what auto picks here (no systemd); said explicitly
        "nodeagent_install_method": "checkout",  # the package is proven in tests/functional/test_systemd_host.py
        "nodeagent_tls": "self_signed",
        "nodeagent_admin_token_name": "ansible-test",
    }
    env = _env(base / "ansible-home")
    h = SimpleNamespace(
        base=base, extra=extra, env=env, url=f"https://127.0.0.1:{port}",
        config=base / "etc" / "agent.toml", pidfile=base / "run" / "nodeagent.pid",
        token_file=base / "etc" / "admin.token", cert=base / "etc" / "tls" / "agent.crt",
        venv=base / "opt" / "venv")
    try:
        h.first = _playbook(env, extra)
        yield h
    finally:
        _stop_agent(h.pidfile, h.config)
        drop_host_filter(base / "state")  # the stopped agent's nft tables: a test leaves none
        shutil.rmtree(base, ignore_errors=True)


def test_first_run_brings_up_the_agent(host):
    assert host.first.returncode == 0, _explain(host.first)
    recap = _recap(host.first)
    assert recap["failed"] == 0 and recap["changed"] > 0
    pid = int(host.pidfile.read_text())
    assert _pid_alive(pid)
    assert str(host.venv / "bin" / "nodeagent") in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    assert _get(f"{host.url}/v1/health", host.cert) == (200, {"status": "ok"})
    # the config (S3 keys, peer tokens) and the TLS key are root-only
    assert stat.S_IMODE(host.config.stat().st_mode) == 0o600
    assert stat.S_IMODE((host.cert.parent / "agent.key").stat().st_mode) == 0o600
    assert f'listen = "127.0.0.1:{host.url.rsplit(":", 1)[1]}"' in host.config.read_text()


def test_authenticated_call_with_the_admin_token(host):
    assert host.first.returncode == 0, _explain(host.first)
    assert stat.S_IMODE(host.token_file.stat().st_mode) == 0o600
    token = host.token_file.read_text().strip()
    assert token and token not in host.first.stdout + host.first.stderr  # no_log kept it out
    status, body = _get(f"{host.url}/v1/pools", host.cert, token)
    assert status == 200, body
    assert "default" in json.dumps(body)
    status, body = _get(f"{host.url}/v1/pools", host.cert)
    assert status == 401, body
    listed = subprocess.run([str(host.venv / "bin" / "nodeagent"), "--config", str(host.config),
                             "token", "list", "--json"], capture_output=True, text=True, check=True)
    assert "ansible-test" in listed.stdout


def test_second_run_changes_nothing(host):
    assert host.first.returncode == 0, _explain(host.first)
    pid = host.pidfile.read_text()
    run = _playbook(host.env, host.extra)
    assert run.returncode == 0, _explain(run)
    recap = _recap(run)
    assert recap["changed"] == 0, f"changed: {_changed_tasks(run)}"
    assert recap["failed"] == 0
    assert host.pidfile.read_text() == pid  # not restarted


def test_check_mode_changes_nothing(host):
    assert host.first.returncode == 0, _explain(host.first)
    before = host.config.read_text()
    run = _playbook(host.env, host.extra, "--check")
    assert run.returncode == 0, _explain(run)
    assert _recap(run)["changed"] == 0, f"changed: {_changed_tasks(run)}"
    run = _playbook(host.env, {**host.extra, "nodeagent_log_level": "debug"}, "--check")
    assert run.returncode == 0, _explain(run)
    assert "Render agent.toml" in _changed_tasks(run)
    assert host.config.read_text() == before  # --check wrote nothing


def test_config_change_restarts_the_agent(host):
    assert host.first.returncode == 0, _explain(host.first)
    old_pid = int(host.pidfile.read_text())
    run = _playbook(host.env, {**host.extra, "nodeagent_log_level": "debug"})
    assert run.returncode == 0, _explain(run)
    changed = _changed_tasks(run)
    assert "Render agent.toml" in changed and any("Restart nodeagent" in t for t in changed), changed
    new_pid = int(host.pidfile.read_text())
    assert new_pid != old_pid and not _pid_alive(old_pid) and _pid_alive(new_pid)
    assert 'log_level = "debug"' in host.config.read_text()
    host.extra["nodeagent_log_level"] = "debug"  # the host's state for the tests after this one
    assert _get(f"{host.url}/v1/health", host.cert)[0] == 200


def test_a_lost_admin_token_is_replaced(host):
    assert host.first.returncode == 0, _explain(host.first)
    old = host.token_file.read_text().strip()
    host.token_file.unlink()
    run = _playbook(host.env, host.extra)
    assert run.returncode == 0, _explain(run)
    assert {"Revoke an admin token whose secret is lost", "Create the admin token"} <= set(_changed_tasks(run))
    new = host.token_file.read_text().strip()
    assert new != old and new not in run.stdout
    assert _get(f"{host.url}/v1/pools", host.cert, new)[0] == 200
    assert _get(f"{host.url}/v1/pools", host.cert, old)[0] == 401


def test_the_roles_ca_issues_the_api_certificate(host):
    """nodeagent_tls=ca: the role's CA on the controller signs the host's API certificate (the key
    stays on the host) for its names; a client trusting that CA (as a peer's [peers] ca does)
    verifies the agent, one without it does not; a new name signs the certificate again, the
    agent restarted onto it. (That a further run changes nothing on this host is checked by
    test_images_imported_and_removed_through_the_module, which runs after this one.)"""
    from agent.client import ApiError, Client
    assert host.first.returncode == 0, _explain(host.first)
    pki = host.base / "pki"  # the controller's side
    extra = {**host.extra, "nodeagent_tls": "ca", "nodeagent_ca_dir": str(pki)}
    run = _playbook(host.env, extra)
    assert run.returncode == 0, _explain(run)
    changed = _changed_tasks(run)
    assert {"Make the CA on the controller", "Sign this host's API certificate on the controller",
            "Copy the API certificate and the CA"} <= set(changed), changed
    assert any("Restart nodeagent" in t for t in changed), changed
    host.extra, host.cert = extra, host.cert.parent / "ca.crt"  # the host's state for the tests after this one
    assert host.cert.read_bytes() == (pki / "ca.crt").read_bytes()
    assert sorted(p.name for p in host.cert.parent.iterdir()) == ["agent.crt", "agent.csr", "agent.key", "ca.crt"]
    assert stat.S_IMODE((host.cert.parent / "agent.key").stat().st_mode) == 0o600
    assert not (pki / "localhost.api.key").exists() and stat.S_IMODE((pki / "ca.key").stat().st_mode) == 0o600
    token = host.token_file.read_text().strip()
    assert "default" in json.dumps(Client(host.url, token, ca=str(host.cert)).get("/v1/pools"))
    with pytest.raises(ApiError) as e:
        Client(host.url, token).get("/v1/pools")  # the system's trust store does not know the role's CA
    assert e.value.code == "tls"
    text = subprocess.run(["openssl", "x509", "-noout", "-text", "-in", str(host.cert.parent / "agent.crt")],
                          capture_output=True, text=True, check=True).stdout
    assert "IP Address:127.0.0.1" in text and "DNS:localhost" in text and "TLS Web Client Authentication" in text
    renamed = {**extra, "nodeagent_tls_subject_alt_names": ["DNS:api.example.net"]}
    run = _playbook(host.env, renamed)
    assert run.returncode == 0, _explain(run)
    assert "Sign this host's API certificate on the controller" in _changed_tasks(run)
    host.extra = renamed
    served = ssl.get_server_certificate(("127.0.0.1", int(host.url.rsplit(":", 1)[1])))
    assert "api.example.net" in subprocess.run(["openssl", "x509", "-noout", "-ext", "subjectAltName"], input=served,
                                               capture_output=True, text=True, check=True).stdout


def test_ansible_lint_passes(tmp_path):
    run = subprocess.run([_tool("ansible-lint")], cwd=ANSIBLE_DIR, env=_env(tmp_path),
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-5000:] + run.stderr[-3000:]


@pytest.mark.parametrize("drop, bad, expected", [
    ("nodeagent_listen", {}, "missing required arguments: nodeagent_listen"),
    (None, {"nodeagent_listen": "nowhere"}, "nodeagent_listen must be HOST:PORT"),
    (None, {"nodeagent_pools": {"images": {"kind": "object", "bucket": "b"}}},
     "nodeagent_pools.images (kind object) lacks endpoint, access_key, secret_key"),
    (None, {"nodeagent_tls": "provided", "nodeagent_tls_cert_src": "/x.crt"},
     "nodeagent_tls_cert_src and nodeagent_tls_key_src must be set together"),
    (None, {"nodeagent_tls": "sometimes"}, "nodeagent_tls"),
])
def test_bad_variables_fail_early_and_change_nothing(tmp_path, drop, bad, expected):
    extra = {"nodeagent_listen": f"127.0.0.1:{_free_port()}", "nodeagent_prefix": str(tmp_path / "opt"),
             "nodeagent_config_dir": str(tmp_path / "etc"), "nodeagent_state_dir": str(tmp_path / "state"),
             "nodeagent_run_dir": str(tmp_path / "run"), "nodeagent_log_dir": str(tmp_path / "log"),
             "nodeagent_install_method": "checkout"}
    extra.pop(drop, None)
    extra.update(bad)
    run = _playbook(_env(tmp_path / "ansible-home"), extra)
    assert run.returncode != 0
    assert expected in run.stdout, _explain(run)
    assert _recap(run)["changed"] == 0
    left = sorted(p.name for p in tmp_path.iterdir() if p.name != "ansible-home")
    assert left == [], left


def test_images_imported_and_removed_through_the_module(host, tmp_path):
    assert host.first.returncode == 0, _explain(host.first)
    disk = tmp_path / "tiny.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "16M"], check=True)
    token = host.token_file.read_text().strip()
    image = {"name": "ansible-tiny", "source": {"type": "file", "path": str(disk)}, "format": "qcow2"}

    def names():
        status, body = _get(f"{host.url}/v1/images", host.cert, token)
        assert status == 200, body
        return [i["name"] for i in body["images"]]

    run = _playbook(host.env, {**host.extra, "nodeagent_images": [image]}, "--check")
    assert run.returncode == 0, _explain(run)
    assert _changed_tasks(run) == ["Manage images through the API"] and "ansible-tiny" not in names()
    run = _playbook(host.env, {**host.extra, "nodeagent_images": [image]})
    assert run.returncode == 0, _explain(run)
    assert _changed_tasks(run) == ["Manage images through the API"]
    assert "ansible-tiny" in names()
    run = _playbook(host.env, {**host.extra, "nodeagent_images": [image]})
    assert run.returncode == 0 and _recap(run)["changed"] == 0, _explain(run)
    gone = {"name": "ansible-tiny", "state": "absent"}
    run = _playbook(host.env, {**host.extra, "nodeagent_images": [gone]})
    assert run.returncode == 0 and _changed_tasks(run) == ["Manage images through the API"], _explain(run)
    assert "ansible-tiny" not in names()
    # a source the agent cannot read fails with the agent's message, leaving no image
    bad = {**image, "source": {"type": "file", "path": str(tmp_path / "absent.qcow2")}}
    run = _playbook(host.env, {**host.extra, "nodeagent_images": [bad]})
    assert run.returncode != 0 and "absent.qcow2" in run.stdout, _explain(run)
    assert "ansible-tiny" not in names()


def test_check_mode_on_a_fresh_host_writes_nothing(tmp_path):
    """Nor on the controller: the role's CA (nodeagent_tls=ca) is not made in --check."""
    extra = {"nodeagent_listen": f"127.0.0.1:{_free_port()}", "nodeagent_prefix": str(tmp_path / "opt"),
             "nodeagent_config_dir": str(tmp_path / "etc"), "nodeagent_state_dir": str(tmp_path / "state"),
             "nodeagent_run_dir": str(tmp_path / "run"), "nodeagent_log_dir": str(tmp_path / "log"),
             "nodeagent_tls": "ca", "nodeagent_ca_dir": str(tmp_path / "pki"), "nodeagent_service_mode": "daemon",
             "nodeagent_install_method": "checkout",
             "nodeagent_images": [{"name": "x", "source": {"type": "file", "path": "/x.qcow2"}}]}
    run = _playbook(_env(tmp_path / "ansible-home"), extra, "--check")
    assert run.returncode == 0, _explain(run)
    assert {"Create the agent's venv", "Render agent.toml", "Make the CA on the controller",
            "Make this host's API key and certificate request", "Write the API certificate's names on the controller",
            "Install the daemon control script"} <= set(_changed_tasks(run))
    left = sorted(p.name for p in tmp_path.iterdir() if p.name != "ansible-home")
    assert left == [], left


def test_config_template_renders_every_pool_kind_tls_and_peers(tmp_path):
    """agent.toml.j2 with local, block (RBD), object (S3) pools, TLS with a client CA and
    peers: what the agent's own parser reads back is what the variables said."""
    role = ANSIBLE_DIR / "roles" / "nodeagent"
    playbook = tmp_path / "render.yml"
    dest = tmp_path / "agent.toml"
    playbook.write_text(json.dumps([{
        "name": "Render agent.toml", "hosts": "localhost", "gather_facts": False,
        "vars_files": [str(role / "defaults" / "main.yml"), str(role / "vars" / "main.yml")],
        "tasks": [{"name": "Render", "ansible.builtin.template": {
            "src": str(role / "templates" / "agent.toml.j2"), "dest": str(dest), "mode": "0600"}}],
    }]))
    extra = {
        "nodeagent_listen": "[::1]:9443", "nodeagent_state_dir": "/srv/na", "nodeagent_config_dir": "/etc/na",
        "nodeagent_tls": "provided", "nodeagent_tls_client_ca_src": "/ca.pem", "nodeagent_default_pool": "ceph",
        "nodeagent_pools": {
            "default": {"kind": "local", "path": "/srv/pool"},
            "ceph": {"kind": "block", "pool": "rbd", "conf": "/etc/ceph/ceph.conf", "user": "admin"},
            "s3 images": {"kind": "object", "endpoint": "https://s3.example.net", "bucket": "b",
                          "access_key": "AK", "secret_key": 'se"cr\\et', "part_size": 8388608}},
        "nodeagent_network": {"bridge": "br9", "subnet": "10.99.0.0/24", "nat": False},
        "nodeagent_peers": {"node2": {"url": "https://10.0.0.12:8470", "token": "na_x_y"}},
        "ansible_facts": {"service_mgr": "sysvinit"},
    }
    run = subprocess.run([_tool("ansible-playbook"), "-i", "localhost,", "-c", "local", str(playbook),
                          "-e", json.dumps(extra)], cwd=ROOT, env=_env(tmp_path / "home"),
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, _explain(run)
    from agent import config
    cfg = config.load(str(dest), env={})
    assert cfg.api.listen == "[::1]:9443" and cfg.state_dir == "/srv/na"
    assert (cfg.api.tls_cert, cfg.api.tls_key, cfg.api.client_ca) == (
        "/etc/na/tls/agent.crt", "/etc/na/tls/agent.key", "/etc/na/tls/client-ca.crt")
    assert cfg.default_pool == "ceph"
    assert cfg.pools["default"].kind == "local" and cfg.pools["default"].options() == {"path": "/srv/pool"}
    assert cfg.pools["ceph"].kind == "block" and cfg.pools["ceph"].options()["pool"] == "rbd"
    s3 = cfg.pools["s3 images"]
    assert s3.kind == "object" and s3.options()["secret_key"] == 'se"cr\\et' and s3.options()["part_size"] == 8388608
    assert (cfg.network.bridge, cfg.network.subnet, cfg.network.nat) == ("br9", "10.99.0.0/24", False)
    assert cfg.peers["node2"].url == "https://10.0.0.12:8470" and cfg.peers["node2"].token == "na_x_y"


def _role_packages(tmp_path, pools: dict) -> list[str]:
    """The packages the role would install on a host with ``pools`` (its package tasks in
    --check mode: nothing is installed)."""
    playbook = tmp_path / "packages.yml"
    playbook.write_text(json.dumps([{
        "name": "Packages", "hosts": "localhost", "gather_facts": False,
        "tasks": [{"name": "Package tasks", "ansible.builtin.include_role": {
                       "name": "nodeagent", "tasks_from": "packages.yml"}},
                  {"name": "Keep", "check_mode": False, "ansible.builtin.copy": {
                       "dest": str(tmp_path / "packages.json"), "mode": "0600",
                       "content": "{{ _nodeagent_packages | to_json }}"}}],
    }]))
    run = subprocess.run([_tool("ansible-playbook"), "-i", "localhost,", "-c", "local", "--check", str(playbook),
                          "-e", json.dumps({"nodeagent_listen": "127.0.0.1:1", "nodeagent_pools": pools,
                                            "nodeagent_manage_kvm": False})],
                         cwd=ANSIBLE_DIR, env=_env(tmp_path / "home"), capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, _explain(run)
    return json.loads((tmp_path / "packages.json").read_text())


def _section(name: str) -> list[str]:
    names, current = [], None
    for line in (ROOT / "scripts" / "packages.txt").read_text().splitlines():
        entry = line.split("#", 1)[0].strip()
        if entry.startswith("["):
            current = entry.strip("[]")
        elif entry and current == name:
            names.append(entry)
    return names


def test_the_role_installs_runtime_packages_only(tmp_path):
    """A hypervisor gets [runtime]; [ceph-client] only with a Ceph RBD pool; never [dev]
    (Ceph servers, registry, test images, compilers)."""
    runtime, ceph, dev = _section("runtime"), _section("ceph-client"), _section("dev")
    assert runtime and ceph and {"ceph-mon", "docker-registry", "gcc", "libvirt-dev", "criu"} <= set(dev)
    assert _role_packages(tmp_path, {"default": {"kind": "local"}}) == runtime
    with_rbd = {"default": {"kind": "local"}, "ceph": {"kind": "block", "pool": "rbd"}}
    assert _role_packages(tmp_path, with_rbd) == runtime + ceph


def test_peers_from_the_inventory(tmp_path):
    """nodeagent_peer_group: each host of the group makes a peer token for every other one and
    gets a [peers] entry per other host carrying the token that host made for it; a second
    run changes nothing; a lost token file is replaced. Two hosts of a local inventory, the
    role's peer tasks and agent.toml.j2 only (the agent from this venv). A peer whose API
    certificate comes from the role's CA (nodeagent_tls=ca) is called over https with that CA."""
    hosts = {}
    for name in ("peer-a", "peer-b"):
        d = tmp_path / name
        hosts[name] = {"ansible_connection": "local", "nodeagent_listen": f"127.0.0.1:{_free_port()}",
                       "nodeagent_config_dir": str(d / "etc"), "nodeagent_state_dir": str(d / "state"),
                       "nodeagent_prefix": str(d / "opt"), "nodeagent_venv": str(BIN.parent),
                       "nodeagent_import_dirs": [str(d / "import")], "nodeagent_peer_group": "fleet"}
    hosts["peer-a"]["nodeagent_tls"] = "ca"  # its API certificate from the role's CA: peer-b verifies it with that CA
    inventory = tmp_path / "inventory.json"
    inventory.write_text(json.dumps({"fleet": {"hosts": hosts}}))
    playbook = tmp_path / "peers.yml"
    # include_role: the role's defaults stay below the inventory's variables (vars_files would not)
    playbook.write_text(json.dumps([{
        "name": "Peers", "hosts": "fleet", "gather_facts": False,
        "tasks": [{"name": f"Role tasks {t}", "ansible.builtin.include_role": {"name": "nodeagent", "tasks_from": t}}
                  for t in ("peers.yml", "config.yml")],
    }]))

    def play():
        run = subprocess.run([_tool("ansible-playbook"), "-i", str(inventory), str(playbook)], cwd=ROOT,
                             env=_env(tmp_path / "home"), capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, _explain(run)
        return run

    from agent import config

    def listed(host: str) -> list[dict]:
        out = subprocess.run([str(BIN / "nodeagent"), "--config", "/dev/null", "token", "list", "--json"],
                             env=dict(os.environ, NODEAGENT_STATE_DIR=str(tmp_path / host / "state")),
                             capture_output=True, text=True, check=True).stdout
        data = json.loads(out)
        return data["tokens"] if isinstance(data, dict) else data

    def check():
        for name, other in (("peer-a", "peer-b"), ("peer-b", "peer-a")):
            cfg = config.load(str(tmp_path / name / "etc" / "agent.toml"), env={})
            assert list(cfg.peers) == [other]
            tls = other == "peer-a"
            assert cfg.peers[other].url == f"{'https' if tls else 'http'}://{hosts[other]['nodeagent_listen']}"
            assert cfg.peers[other].ca == (str(tmp_path / name / "etc" / "tls" / "ca.crt") if tls else None)
            # the token is the one the other host's database holds as a peer token named after this host
            token_id = cfg.peers[other].token.split("_")[1]
            assert [(t["name"], t["role"]) for t in listed(other) if t["id"] == token_id] == [(name, "peer")]
            assert stat.S_IMODE((tmp_path / other / "etc" / "peer-tokens" / f"{name}.token").stat().st_mode) == 0o600
        return {n: config.load(str(tmp_path / n / "etc" / "agent.toml"), env={}).peers for n in hosts}

    first = play()
    assert "na_" not in first.stdout  # no secret in the log
    assert str(tmp_path) in (tmp_path / "peer-a" / "etc" / "agent.toml").read_text()
    before = check()
    again = play()
    assert _changed_tasks(again) == [], _changed_tasks(again)
    assert check() == before
    (tmp_path / "peer-b" / "etc" / "peer-tokens" / "peer-a.token").unlink()
    play()
    after = check()
    assert after["peer-a"]["peer-b"].token != before["peer-a"]["peer-b"].token
    assert after["peer-b"] == before["peer-b"]
