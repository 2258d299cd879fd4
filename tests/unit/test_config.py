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
])
def test_bad_config_names_the_key(tmp_path, text, key):
    f = tmp_path / "agent.toml"
    f.write_text(text + "\n")
    with pytest.raises(InvalidInput) as e:
        config.load(str(f), env={})
    assert key in e.value.message


def test_seccomp_profile_setting_is_checked_at_start(tmp_path):
    assert config.parse({}).containers.seccomp_profile == "default"
    assert config.parse({}).containers.no_new_privileges is False
    assert config.parse({"containers": {"seccomp_profile": "unconfined"}}).containers.seccomp_profile == "unconfined"
    for bad, says in (("relative.json", "absolute path"), (str(tmp_path / "none.json"), "readable")):
        with pytest.raises(InvalidInput, match=f"containers.seccomp_profile: .*{says}"):
            config.parse({"containers": {"seccomp_profile": bad}})
    (tmp_path / "p.json").write_text('{"defaultAction": "SCMP_ACT_ERRNO", "syscalls": []}')
    assert config.parse({"containers": {"seccomp_profile": str(tmp_path / "p.json")}})
