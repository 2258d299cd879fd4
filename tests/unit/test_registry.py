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
