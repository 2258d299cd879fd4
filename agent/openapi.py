"""Generate the OpenAPI 3.1 spec from the route table (agent/api) and the pydantic models."""
from __future__ import annotations

from pydantic import TypeAdapter

from agent import models
from agent.api import PATH_ID_RE, ROUTES

ERROR_TEXT = {400: "Malformed request", 401: "Missing or invalid bearer token", 403: "Token role not allowed",
              404: "Not found", 409: "Conflicts with current state", 413: "Request body too large",
              422: "Valid JSON that cannot be honoured", 503: "A component the agent needs is down"}


def build(version: str = "0.1.0") -> dict:
    schemas: dict = {}

    def ref(model) -> dict:
        js = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(js.pop("$defs", {}))
        schemas[model.__name__] = js
        return {"$ref": f"#/components/schemas/{model.__name__}"}

    error_ref = ref(models.Error)
    paths: dict = {}
    for r in ROUTES:
        op: dict = {"summary": r.summary, "operationId": r.endpoint.replace(".", "_"), "tags": [r.tag],
                    "responses": {}}
        params = [{"name": p, "in": "path", "required": True,
                   "schema": TypeAdapter(r.path_types[p]).json_schema() if p in r.path_types else
                   {"type": "string", "pattern": PATH_ID_RE.pattern, "maxLength": 128}}
                  for p in _path_params(r.path)]
        params += [{"name": q["name"], "in": "query", "required": q.get("required", False), "schema": q["schema"],
                    "description": q.get("description", "")} for q in r.query]
        if params:
            op["parameters"] = params
        if isinstance(r.body, str):  # a streamed body of that media type (an upload)
            op["requestBody"] = {"required": True, "content": {r.body: {"schema": {"type": "string",
                                                                                 "format": "binary"}}}}
        elif r.body is not None:
            op["requestBody"] = {"required": True, "content": {"application/json": {"schema": ref(r.body)}}}
        for status, what in r.responses.items():
            op["responses"][str(status)] = _response(status, what, ref, error_ref)
        errors = {400, 503}
        if r.auth != "none":
            errors |= {401, 403}
        if r.body is not None:
            errors |= {413, 422}
        if params:
            errors |= {404}
        for status in sorted(errors):
            op["responses"].setdefault(str(status), _response(status, None, ref, error_ref))
        op["security"] = [] if r.auth == "none" else [{"bearer": []}, {"clientCertificate": []}]
        paths.setdefault(r.path, {})[r.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "nodeagent", "version": version,
                 "description": "Per-host IaaS node agent: images, VMs and containers. Long work returns "
                                "202 with an operation; poll /v1/operations/{id} or /wait on it."},
        "paths": paths,
        "components": {"schemas": schemas,
                       "securitySchemes": {
                           "bearer": {"type": "http", "scheme": "bearer"},
                           # with [api] client_ca: a certificate [api] cert_roles maps to a role, when no
                           # bearer token is sent
                           "clientCertificate": {"type": "mutualTLS"}}},
        "security": [{"bearer": []}, {"clientCertificate": []}],
    }


def _path_params(path: str) -> list[str]:
    return [seg[1:-1] for seg in path.split("/") if seg.startswith("{")]


def _response(status: int, what, ref, error_ref) -> dict:
    if status >= 400:
        return {"description": ERROR_TEXT.get(status, "Error"), "content": {"application/json": {"schema": error_ref}}}
    if what is None:
        return {"description": "OK"}
    if what is dict:
        return {"description": "OK", "content": {"application/json": {"schema": {"type": "object"}}}}
    if isinstance(what, str):
        return {"description": "OK", "content": {what: {"schema": {"type": "string"}}}}
    return {"description": "OK", "content": {"application/json": {"schema": ref(what)}}}
