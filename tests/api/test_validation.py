"""Input at the API boundary: refused at once with a clear 4xx, never accepted and then
failing (or silently changed) in the operation, and never a 500."""
import pytest

from tests.api.conftest import assert_error


def _unchanged(admin):
    return admin.get("/v1/instances").json(), [o["id"] for o in admin.get("/v1/operations").json()["operations"]]


@pytest.mark.parametrize("body", [
    b"[" * 100_000 + b"]" * 100_000,                                    # RecursionError in the decoder
    b'{"name": "a", "env": ' + b'{"a": ' * 100_000 + b"1" + b"}" * 100_001,
    b'{"command": ' + b"[" * 40 + b"]" * 40 + b"}",                     # deeper than any body needs
])
def test_deeply_nested_bodies_are_400_on_every_endpoint(admin, body):
    for path in ("/v1/instances", "/v1/images", "/v1/instances/nosuch/exec", "/v1/migrations"):
        err = assert_error(admin.post(path, data=body, headers={"Content-Type": "application/json"}), 400, "invalid")
        assert "nests deeper" in err["message"], err


@pytest.mark.parametrize("body, says", [
    (b'{"name": "a", "name": "b", "kind": "container", "image": "busybox"}', "'name' appears twice"),
    (b'{"name": "a", "kind": "container", "image": "busybox", "env": {"A": "1", "A": "2"}}', "'A' appears twice"),
    (b'{"name": "a", "kind": "container", "image": "busybox", "memory_mib": NaN}', "NaN is not JSON"),
    (b'{"name": "a", "kind": "container", "image": "busybox", "cpus": -Infinity}', "-Infinity is not JSON"),
])
def test_ambiguous_json_is_refused_not_guessed(admin, body, says):
    """Parsers disagree on duplicate keys (first or last wins): a proxy could check one value
    while the agent acts on the other, so the agent takes neither; NaN/Infinity are not JSON."""
    before = _unchanged(admin)
    err = assert_error(admin.post("/v1/instances", data=body, headers={"Content-Type": "application/json"}),
                       400, "invalid")
    assert says in err["message"], err
    assert _unchanged(admin) == before


def test_brackets_inside_strings_do_not_count_as_nesting(admin, images):
    r = admin.post("/v1/instances", json={"name": "deepstr", "kind": "container", "image": "busybox",
                                          "command": ["/bin/echo", "[" * 5000 + '\\"{' * 100]})
    assert r.status_code == 202, r.text
    assert admin.wait(r.json())["status"] == "succeeded"
    assert admin.delete("/v1/instances/deepstr").status_code == 200


@pytest.mark.parametrize("extra, field, says", [
    ({"command": ["/bin/echo", "a\x00b"]}, "command.1", "NUL"),
    ({"env": {"A\x00B": "1"}}, "env.A\\x00B.[key]", "without '='"),
    ({"env": {"A=B": "1"}}, "env.A=B.[key]", "without '='"),
    ({"env": {"": "1"}}, "env..[key]", "at least 1 character"),
    ({"env": {"A": "x\x00y"}}, "env.A", "NUL"),
    ({"cpus": 0.0001}, "(body)", "0.01"),                    # below the kernel's smallest CFS quota
    ({"cpus": 2000}, "cpus", "1024"),
    ({"command": []}, "command", "at least 1"),               # was: silently the image's default
    ({"command": [""]}, "(body)", "command[0] is empty"),
    ({"user_data": "#cloud-config\n"}, "(body)", "for VMs"),
    ({"image": "../busybox"}, "image", "letters"),
    ({"pool": "a\nb"}, "pool", "letters"),
    ({"ports": [{"host_port": 8080, "container_port": 80, "host_ip": "999.1.1.1"}]}, "ports.0.host_ip", "IPv4"),
    ({"ports": [{"host_port": 8080, "container_port": 80, "host_ip": "1e100"}]}, "ports.0.host_ip", "IPv4"),
    ({"ports": [{"host_port": 8080, "container_port": 80}] * 2}, "(body)", "published twice"),
    ({"network": "none", "ports": [{"host_port": 8080, "container_port": 80}]}, "(body)", "bridge"),
])
def test_container_create_refuses_what_it_cannot_honour(admin, images, extra, field, says):
    before = _unchanged(admin)
    err = assert_error(admin.post("/v1/instances", json={"name": "bad1", "kind": "container",
                                                          "image": "busybox", **extra}), 422, "unprocessable")
    assert [f["field"] for f in err["details"]["fields"]] == [field], err
    assert says in err["message"], err
    assert "\x00" not in err["message"] and "\n" not in err["message"]
    assert _unchanged(admin) == before


@pytest.mark.parametrize("extra, says", [
    ({"cpus": 256}, "1..255"),                 # the API allowed 256, the driver 1..255
    ({"cpus": 0.5}, "whole vCPUs"),            # was: silently 1 vCPU
    ({"cpus": 1.5}, "whole vCPUs"),            # was: silently 2 vCPUs
    ({"env": {"A": "1"}}, "for containers"),   # was: silently ignored
    ({"pids_max": 10}, "for containers"),
    ({"network": "host"}, "for containers"),  # was: silently no NIC at all
    ({"user_data": "\x00"}, "NUL"),
    ({"user_data": "x" * 70_000}, "at most 65536"),
])
def test_vm_create_refuses_what_it_cannot_honour(admin, images, extra, says):
    before = _unchanged(admin)
    err = assert_error(admin.post("/v1/instances", json={"name": "badvm", "kind": "vm",
                                                          "image": "tiny-vm", "memory_mib": 64, **extra}),
                       422, "unprocessable")
    assert says in err["message"], err
    assert _unchanged(admin) == before


def test_vm_whole_cpus_given_as_float_are_fine(admin, images):
    r = admin.post("/v1/instances", json={"name": "vmcpu", "kind": "vm", "image": "tiny-vm",
                                          "memory_mib": 64, "cpus": 2.0, "start": False})
    assert r.status_code == 202, r.text
    op = admin.wait(r.json())
    assert op["status"] == "succeeded" and op["result"]["instance"]["cpus"] == 2, op
    assert admin.delete("/v1/instances/vmcpu").status_code == 200


@pytest.mark.parametrize("command, says", [
    (["/bin/echo", "a\x00b"], "NUL"),
    (["\x00"], "NUL"),
    ([""], "command[0] is empty"),
    (["x" * 40_000], "at most"),
])
def test_exec_refuses_nul_and_empty_programs(admin, images, command, says):
    r = admin.post("/v1/instances", json={"name": "execv", "kind": "container", "image": "busybox",
                                          "command": ["/bin/sleep", "100"]})
    assert admin.wait(r.json())["status"] == "succeeded"
    try:
        err = assert_error(admin.post("/v1/instances/execv/exec", json={"command": command}), 422)
        assert says in err["message"], err
    finally:
        admin.delete("/v1/instances/execv")


@pytest.mark.parametrize("name", ["a..b", "..", "a\x00b", "a\nb", "x/y", "\u0430bc"])
def test_image_names_must_stay_reachable_by_url(admin, tmp_path, name):
    disk = tmp_path / "d.raw"
    disk.write_bytes(b"\0" * 4096)
    before = admin.get("/v1/images").json()
    assert_error(admin.post("/v1/images", json={"name": name, "format": "raw",
                                                "source": {"type": "file", "path": str(disk)}}), 422)
    assert admin.get("/v1/images").json() == before


@pytest.mark.parametrize("path", ["/v1/instances/abc%0A", "/v1/images/busybox%0A", "/v1/operations/x%0A/wait",
                                  "/v1/instances/%D0%B0bc"])
def test_path_ids_with_a_trailing_newline_or_unicode_are_400(admin, images, path):
    assert_error(admin.get(path), 400, "invalid")


@pytest.mark.parametrize("body, field", [
    ({"name": "x", "source": {"type": "file", "path": "/srv/a\nb.qcow2"}}, "source.file.path"),
    ({"name": "x", "source": {"type": "url", "url": "http://h/a b"}}, "source.url.url"),
    ({"name": "x", "source": {"type": "url", "url": "http://h/a\r\nHost: evil"}}, "source.url.url"),
    ({"name": "x", "source": {"type": "registry", "reference": "reg/a\nb"}}, "source.registry.reference"),
    ({"name": "x", "source": {"type": "registry", "reference": "-reg/a"}}, "source.registry.reference"),
    ({"name": "x", "source": {"type": "s3", "pool": "../b", "digest": "sha256:" + "0" * 64}}, "source.s3.pool"),
])
def test_image_sources_with_control_characters_or_odd_names_are_422(admin, body, field):
    before = _unchanged(admin)
    err = assert_error(admin.post("/v1/images", json=body), 422, "unprocessable")
    assert field in [f["field"] for f in err["details"]["fields"]], err
    assert _unchanged(admin) == before


@pytest.mark.parametrize("body, field", [
    ({"instance": "../x", "destination": "peer"}, "instance"),
    ({"instance": "x", "destination": "a/b"}, "destination"),
    ({"instance": "x", "destination": "p\n"}, "destination"),
])
def test_migration_names_are_refs(admin, body, field):
    err = assert_error(admin.post("/v1/migrations", json=body), 422, "unprocessable")
    assert field in [f["field"] for f in err["details"]["fields"]], err
