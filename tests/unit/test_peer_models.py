"""The peer models: every string a peer sends (or a destination answers) has a pattern, so a
field cannot be added without one; the answers a source acts on are parsed as strictly."""
import pytest
from pydantic import ValidationError

from agent import models

# strings that are the tenant's content, never a host path, cgroup, libvirt name or command
# of the host: what the guest or container gets (its env, command, user_data) and the
# source's own name of the image (the destination goes by image.id)
FREE_TEXT = {"spec.image", "spec.env.*", "spec.env.<key>", "spec.command.*", "spec.user_data"}


def _strings(schema: dict, defs: dict, path: str):
    """(path, node) of every string node in a JSON schema."""
    if "$ref" in schema:
        yield from _strings(defs[schema["$ref"].rsplit("/", 1)[1]], defs, path)
        return
    for key in ("anyOf", "oneOf", "allOf"):
        for sub in schema.get(key, []):
            yield from _strings(sub, defs, path)
    if schema.get("type") == "string":
        yield path, schema
    for name, sub in (schema.get("properties") or {}).items():
        yield from _strings(sub, defs, f"{path}.{name}" if path else name)
    if isinstance(schema.get("items"), dict):
        yield from _strings(schema["items"], defs, path + ".*")
    for sub in (schema.get("patternProperties") or {}).values():  # dict[ConstrainedKey, V]
        yield from _strings(sub, defs, path + ".*")
    if isinstance(schema.get("additionalProperties"), dict):  # dict[str, V]: keys unconstrained
        yield from _strings(schema["additionalProperties"], defs, path + ".*")
        if "pattern" not in (schema.get("propertyNames") or {}):
            yield path + ".<key>", {"type": "string"}


@pytest.mark.parametrize("model", [models.IncomingMigration, models.IncomingFinish, models.IncomingPrepared,
                                   models.Deleted, models.Received, models.PeerHost])
def test_every_string_a_peer_sends_has_a_pattern(model):
    schema = model.model_json_schema()
    unchecked = [p for p, node in _strings(schema, schema.get("$defs", {}), "")
                 if "pattern" not in node and "enum" not in node and "const" not in node and p not in FREE_TEXT]
    assert unchecked == [], f"give these fields a constrained type from agent/models.py: {unchecked}"


def test_the_check_sees_dict_keys_and_values():
    class Loose(models.Model):
        paths: dict[str, models.HostPath]
        names: dict[models.VolumeName, str]
    schema = Loose.model_json_schema()
    found = {p for p, node in _strings(schema, {}, "") if "pattern" not in node}
    assert found == {"paths.<key>", "names.*"}


def prepared(**over):
    return {"disk_sources": {"vda": "/var/lib/nodeagent/pool/volumes/i-x-disk.qcow2", "sda": "/s/seed.iso"},
            "migration_uri": "qemu+tcp://198.18.0.2/system", **over}


@pytest.mark.parametrize("uri", ["qemu+tcp://198.18.0.2/system", "qemu+tls://host-2.example:16514/system",
                                 "qemu+tcp://[fd00::2]/system", "", "fake://host-b"])
def test_migration_uris_a_source_accepts(uri):
    assert models.IncomingPrepared.model_validate(prepared(migration_uri=uri)).migration_uri == uri


@pytest.mark.parametrize("uri", [
    "qemu+ext:///system?command=/tmp/x",  # libvirt runs the command
    "qemu+ssh://-oProxyCommand=sh/system",  # ssh option injection
    "qemu+ssh://h/system", "qemu+unix:///system?socket=/tmp/evil.sock", "qemu:///system", "qemu:///session",
    "qemu+tcp://h/system?no_verify=1", "qemu+tls://h/system?pkipath=/tmp", "qemu+tcp://user@h/system",
    "qemu+tcp://h/system\n", "qemu+tcp://-h/system", "test:///default"])
def test_migration_uris_that_would_run_or_reach_something_else_are_refused(uri):
    with pytest.raises(ValidationError, match="migration_uri"):
        models.IncomingPrepared.model_validate(prepared(migration_uri=uri))


@pytest.mark.parametrize("over", [
    {"disk_sources": {"vda": "relative/path"}}, {"disk_sources": {"vda": "/x\n<evil/>"}},
    {"disk_sources": {"../vda": "/x"}}, {"disk_sources": {"vda": "http://h/x"}},
    {"console_log": "log"}, {"disk_attach": {"vda": {"config": "/etc/ceph.conf", "key": "AQ=="}}},
    {"disk_attach": {"vda": {"secret_uuid": "x'/><evil"}}}, {"extra": 1}])
def test_a_destinations_answer_is_parsed_strictly(over):
    with pytest.raises(ValidationError):
        models.IncomingPrepared.model_validate(prepared(**over))


def test_the_public_api_uses_the_same_types():
    fields = models.InstanceCreate.model_fields
    assert fields["name"].metadata == models.IncomingInstance.model_fields["name"].metadata
    with pytest.raises(ValidationError):
        models.InstanceCreate.model_validate({"name": "a", "kind": "vm", "image": "i", "pool": "../x"})
    with pytest.raises(ValidationError):
        models.PortSpec.model_validate({"host_port": 1, "container_port": 1, "host_ip": "999.0.0.1"})


@pytest.mark.parametrize("cpu", ["<!DOCTYPE x><cpu/>", "<cpu><!ENTITY a 'b'></cpu>", "<domain/>", "<cpux/>",
                                 "<cpu>" + "x" * 70000 + "</cpu>"])
def test_a_peers_cpu_xml_is_one_cpu_element_without_markup_declarations(cpu):
    with pytest.raises(ValidationError):
        models.PeerHost.model_validate({"hostname": "h2", "draining": False, "capacity": {}, "host_cpu": cpu})
    assert models.PeerHost.model_validate({"hostname": "h2", "draining": False, "capacity": {"cpus": 2},
                                           "host_cpu": "<cpu><model>EPYC</model></cpu>"}).host_cpu
