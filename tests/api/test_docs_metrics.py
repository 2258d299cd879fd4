"""OpenAPI spec, docs page (local assets), host/pools, and /metrics."""
from tests.api.conftest import assert_error


def test_openapi_spec_covers_the_contract(reader, anon):
    assert_error(anon.get("/v1/openapi.json"), 401)
    spec = reader.get("/v1/openapi.json").json()
    assert spec["openapi"].startswith("3.")
    for path, method in [("/v1/host", "get"), ("/v1/pools", "get"), ("/v1/pools/{name}", "get"),
                         ("/v1/images", "post"), ("/v1/images/{id}", "delete"), ("/v1/instances", "post"),
                         ("/v1/instances/{id}/actions", "post"), ("/v1/instances/{id}/exec", "post"),
                         ("/v1/instances/{id}/logs", "get"), ("/v1/instances/{id}/stats", "get"),
                         ("/v1/migrations", "post"), ("/v1/operations/{id}/wait", "get"),
                         ("/v1/operations/{id}", "delete"), ("/v1/events", "get"), ("/metrics", "get")]:
        assert method in spec["paths"][path], (path, method)
    body = spec["paths"]["/v1/instances"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    create = spec["components"]["schemas"][body["$ref"].split("/")[-1]]
    assert create["additionalProperties"] is False and "memory_mib" in create["properties"]


def test_docs_page_uses_only_local_assets(anon):
    page = anon.get("/v1/docs")
    assert page.status_code == 200 and "text/html" in page.headers["Content-Type"]
    assert "http://" not in page.text and "https://" not in page.text
    for asset in ("/v1/docs/docs.js", "/v1/docs/docs.css"):
        r = anon.get(asset)
        assert r.status_code == 200 and "https://" not in r.text
    assert_error(anon.get("/v1/docs/../../etc/passwd"), 404)


def test_host_and_pools(reader):
    h = reader.get("/v1/host").json()
    assert h["cpus"] >= 1 and h["memory_bytes"] > 0 and h["hypervisor"] in ("kvm", "qemu")
    assert h["hypervisor_driver"] == "fake" and h["versions"]["nodeagent"]
    assert isinstance(h["migration_tls"], bool)  # on when this host has the migration certificates
    pools = reader.get("/v1/pools").json()["pools"]
    assert [p["name"] for p in pools] == ["default"] and pools[0]["usage"]["capacity"] > 0
    assert reader.get("/v1/pools/default").json()["default"] is True


def test_metrics_need_a_token_and_count_requests(reader, anon):
    assert_error(anon.get("/metrics"), 401)
    reader.get("/v1/host")
    text = reader.get("/metrics").text
    assert 'nodeagent_http_requests_total{endpoint="/v1/host",method="GET",status="200"}' in text
    assert "nodeagent_http_request_duration_seconds_bucket" in text
    assert "nodeagent_pool_used_bytes" in text and "nodeagent_instances" in text
