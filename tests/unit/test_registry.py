import pytest

from agent import registry
from agent.errors import AgentError, InvalidInput, NotFound


def test_unknown_kind_lists_known_ones():
    with pytest.raises(InvalidInput, match="known: block, fake, local, object"):
        registry.load("backend", "tape")


def test_every_registered_target_names_module_and_class():
    for table in (registry.BACKENDS, registry.DRIVERS, registry.RUNTIMES):
        for kind, target in table.items():
            module, _, cls = target.partition(":")
            assert module and cls, kind


def test_errors_are_rooted_and_render():
    e = NotFound("image abc not found", image="abc")
    assert isinstance(e, AgentError) and e.http_status == 404
    assert e.to_dict() == {"code": "not_found", "message": "image abc not found",
                           "details": {"image": "abc"}}


def test_every_registered_class_is_built_the_same_way():
    import inspect
    want = inspect.signature(registry.Buildable.from_config)
    for name, table in (("backend", registry.BACKENDS), ("driver", registry.DRIVERS), ("runtime", registry.RUNTIMES)):
        for kind in table:
            cls = registry.load(name, kind)
            got = inspect.signature(cls.from_config)
            assert list(got.parameters) == list(want.parameters), (name, kind, got)
            assert [p.kind for p in got.parameters.values()] == [p.kind for p in want.parameters.values()], kind
    for kind in registry.DRIVERS:
        assert isinstance(registry.load("driver", kind).uses_host_network, bool), kind


def test_fakes_are_built_from_config_ignoring_what_they_do_not_use(tmp_path):
    from agent.state import Database
    db = Database(str(tmp_path / "state.db"))
    common = dict(state_dir=str(tmp_path / "x"), db=db, network=None)
    assert registry.build("driver", "fake", {"uri": "ignored"}, **common).list() == []
    assert registry.build("runtime", "fake", {}, **common).list() == []
    pool = registry.build("backend", "fake", {"name": "p", "supports_volumes": False}, **common)
    assert pool.name == "p" and pool.supports_volumes is False
    local = registry.build("backend", "local", {"name": "l"}, **common)
    assert local.path == str(tmp_path / "x")  # no `path` option: under the state dir it is given
