import pytest

from agent import config
from agent.errors import InvalidInput


def test_embedded_defaults_when_default_file_absent(tmp_path, monkeypatch):
    monkeypatch.setattr(config, "DEFAULT_PATH", str(tmp_path / "absent.toml"))
    cfg = config.load(env={})
    assert cfg.state_dir == config.DEFAULT_STATE_DIR
    assert cfg.pools["default"].kind == "local"
    assert cfg.default_pool == "default"
    assert cfg.api.listen.startswith("127.0.0.1:")


def test_file_flag_and_env_overrides(tmp_path):
    f = tmp_path / "agent.toml"
    f.write_text('state_dir = "/srv/na"\n[api]\nlisten = "127.0.0.1:9000"\n'
                 '[pools.fast]\nkind = "local"\npath = "/srv/fast"\n')
    cfg = config.load(str(f), env={})
    assert cfg.state_dir == "/srv/na"
    assert cfg.api.listen == "127.0.0.1:9000"
    assert cfg.pools["fast"].options() == {"path": "/srv/fast"}
    cfg = config.load(env={"NODEAGENT_CONFIG": str(f), "NODEAGENT_STATE_DIR": str(tmp_path),
                           "NODEAGENT_LISTEN": "127.0.0.1:9100"})
    assert cfg.state_dir == str(tmp_path) and cfg.api.listen == "127.0.0.1:9100"


def test_explicit_missing_file_is_an_error(tmp_path):
    with pytest.raises(InvalidInput, match="does not exist"):
        config.load(str(tmp_path / "nope.toml"), env={})


@pytest.mark.parametrize("text, key", [
    ("workers = 0", "workers"),
    ("bogus = 1", "bogus"),
    ('[api]\nlisten = "nowhere"', "api.listen"),
    ('[api]\ntls_cert = "/c.pem"', "api"),
    ('default_pool = "missing"', "default_pool"),
    ('log_level = "loud"', "log_level"),
    ("workers = [", "TOML"),
    ('[hypervisor]\ncpu_model = "../x"', "hypervisor.cpu_model"),
    ('[hypervisor]\ncpu_model = ""', "hypervisor.cpu_model"),
    ('[hypervisor]\ncpu_group = "a b"', "hypervisor.cpu_group"),
])
def test_bad_config_names_the_key(tmp_path, text, key):
    f = tmp_path / "agent.toml"
    f.write_text(text + "\n")
    with pytest.raises(InvalidInput) as e:
        config.load(str(f), env={})
    assert key in e.value.message


@pytest.mark.parametrize("data,problem", [
    ({"api": {"cert_roles": {"cp": "admin"}}}, "cert_roles needs client_ca"),
    ({"api": {"tls_cert": "/c", "tls_key": "/k", "client_ca": "/ca", "cert_roles": {"cp": "root"}}},
     "a role is admin, reader or peer"),
    ({"api": {"client_ca": "/ca"}}, "client_ca needs tls_cert"),
    ({"log_target": "file"}, "needs log_file"),
    ({"log_file": "relative.log"}, "absolute path"),
    ({"log_target": "syslog"}, "log_target must be one of"),
    ({"metrics": {"pool_usage_interval": 0}}, "metrics.pool_usage_interval"),
    ({"operations": {"retention": 10}}, "operations.retention"),
    ({"operations": {"max_finished": 0}}, "operations.max_finished"),
    ({"operations": {"keep": 1}}, "operations.keep"),
])
def test_operations_data_keys_are_checked(data, problem):
    with pytest.raises(InvalidInput, match=problem):
        config.parse(data)


def test_operations_data_keys_parse():
    cfg = config.parse({"log_target": "file", "log_file": "/var/log/nodeagent/agent.log", "log_max_bytes": 0,
                        "api": {"tls_cert": "/c", "tls_key": "/k", "client_ca": "/ca",
                                "cert_roles": {"cp.example": "admin", "host2": "peer"}},
                        "peers": {"host2": {"url": "https://h2:8470", "ca": "/ca", "cert": "/c", "key": "/k"}},
                        "metrics": {"pool_usage_interval": 300},
                        "operations": {"retention": 86400, "max_finished": 500, "prune_interval": 60}})
    assert cfg.api.cert_roles["host2"] == "peer" and cfg.peers["host2"].cert == "/c"
    assert (cfg.operations.retention, cfg.operations.max_finished) == (86400, 500)
    assert cfg.metrics.pool_usage_interval == 300 and cfg.log_max_bytes == 0


def test_seccomp_profile_setting_is_checked_at_start(tmp_path):
    assert config.parse({}).containers.seccomp_profile == "default"
    assert config.parse({}).containers.no_new_privileges is False
    assert config.parse({"containers": {"seccomp_profile": "unconfined"}}).containers.seccomp_profile == "unconfined"
    for bad, says in (("relative.json", "absolute path"), (str(tmp_path / "none.json"), "readable")):
        with pytest.raises(InvalidInput, match=f"containers.seccomp_profile: .*{says}"):
            config.parse({"containers": {"seccomp_profile": bad}})
    (tmp_path / "p.json").write_text('{"defaultAction": "SCMP_ACT_ERRNO", "syscalls": []}')
    assert config.parse({"containers": {"seccomp_profile": str(tmp_path / "p.json")}})


@pytest.mark.parametrize("data,problem", [
    ({"nbd": {"host": "localhost"}}, "must be an IP address"),
    ({"nbd": {"host": "0.0.0.0; rm"}}, "must be an IP address"),
    ({"nbd": {"tls": "x509"}}, "needs nbd.x509_dir"),
    ({"nbd": {"tls": "none", "host": "198.18.0.1"}}, "only on a loopback address"),
    ({"nbd": {"tls": "tls13"}}, "nbd.tls"),
])
def test_nbd_keys_are_checked(data, problem):
    with pytest.raises(InvalidInput, match=problem):
        config.parse(data)


def test_nbd_exports_listen_on_loopback_over_psk_by_default():
    nc = config.parse({}).nbd
    assert (nc.host, nc.tls, nc.x509_dir) == ("127.0.0.1", "psk", None)
