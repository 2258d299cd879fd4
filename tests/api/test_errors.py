"""Bad input: a 4xx with the error body, never a stack trace, nothing created."""
import pytest

from tests.api.conftest import assert_error


def test_unknown_endpoint_and_method(admin):
    assert_error(admin.get("/v1/nope"), 404, "not_found")
    assert_error(admin.put("/v1/instances"), 405)


def test_malformed_json_is_400(admin):
    assert_error(admin.post("/v1/instances", data=b"{not json", headers={"Content-Type": "application/json"}),
                 400, "invalid")
    assert_error(admin.post("/v1/instances", data=b"\xff\xfe"), 400)
    assert_error(admin.post("/v1/instances", json=[1, 2]), 400)


@pytest.mark.parametrize("body", [
    {"name": "a", "kind": "container", "image": "x", "surprise": 1},            # unknown field
    {"name": "a", "kind": "container", "image": "x", "cpus": "lots"},           # wrong type
    {"name": "a", "kind": "toaster", "image": "x"},                             # bad enum
    {"name": "../etc", "kind": "container", "image": "x"},                      # bad name
    {"name": "a", "kind": "container", "image": "x", "memory_mib": -1},         # out of range
    {"kind": "container", "image": "x"},                                        # missing field
])
def test_invalid_instance_bodies_are_422_and_create_nothing(admin, body):
    instances, ops = admin.get("/v1/instances").json(), admin.get("/v1/operations").json()
    err = assert_error(admin.post("/v1/instances", json=body), 422, "unprocessable")
    assert err["details"]["fields"]
    assert admin.get("/v1/instances").json() == instances
    assert admin.get("/v1/operations").json() == ops


def test_huge_body_is_413(admin):
    r = admin.post("/v1/instances", data=b"{" + b" " * (2 * 1024 * 1024) + b"}",
                   headers={"Content-Type": "application/json"})
    assert_error(r, 413, "too_large")


@pytest.mark.parametrize("path", ["/v1/instances/..%2Fetc", "/v1/instances/a%20b", "/v1/instances/%00",
                                  "/v1/images/-rf", "/v1/operations/" + "a" * 200, "/v1/instances/../../etc/passwd"])
def test_odd_path_ids_are_4xx(admin, path):
    r = admin.get(path)
    assert r.status_code in (400, 404), r.text
    assert_error(r, r.status_code)


def test_unknown_ids_are_404(admin):
    assert_error(admin.get("/v1/instances/nosuch"), 404, "not_found")
    assert_error(admin.delete("/v1/instances/nosuch"), 404)
    assert_error(admin.get("/v1/operations/nosuch"), 404)
    assert_error(admin.get("/v1/pools/nosuch"), 404)
    assert_error(admin.post("/v1/instances/nosuch/actions", json={"action": "start"}), 404)


def test_bad_query_params_are_400(admin):
    assert_error(admin.get("/v1/operations/x/wait", params={"timeout": "soon"}), 400)
    assert_error(admin.get("/v1/events", params={"type": "gossip"}), 400)
    assert_error(admin.get("/v1/operations", params={"status": "meh"}), 400)


def test_migration_is_a_clear_422(admin):
    assert_error(admin.post("/v1/migrations", json={"instance": "nosuch", "destination": "h2"}), 404)
