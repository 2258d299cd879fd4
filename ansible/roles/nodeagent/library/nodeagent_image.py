#!/usr/bin/python
"""Ansible module: an image on a nodeagent host, imported or deleted through its API."""
from __future__ import annotations

DOCUMENTATION = r"""
---
module: nodeagent_image
short_description: Import or delete an image on a nodeagent host through its API
description:
  - Makes sure an image of a given name is present (imported with POST /v1/images, waiting on
    the operation) or absent (DELETE /v1/images/{id}). Idempotent by name; supports check mode.
options:
  api_url:
    description: Base URL of the agent, e.g. https://127.0.0.1:8470.
    type: str
    required: true
  token:
    description: An admin bearer token. Give this or I(token_file).
    type: str
  token_file:
    description: A file on the managed host holding the admin bearer token.
    type: path
  ca_path:
    description: CA certificate (or the self-signed certificate) that signs the API's certificate.
    type: path
  validate_certs:
    description: Verify the API's TLS certificate.
    type: bool
    default: true
  name:
    description: Image name.
    type: str
    required: true
  source:
    description: Import source, as the API takes it, e.g. {type: url, url: https://...} or {type: file, path: /srv/x.qcow2}.
    type: dict
  format:
    description: Image format (qcow2, raw, oci); the agent detects it when omitted.
    type: str
  pool:
    description: Storage pool; the agent's default pool when omitted.
    type: str
  state:
    description: Whether the image should exist.
    type: str
    choices: [present, absent]
    default: present
  timeout:
    description: Seconds to wait for the import to finish.
    type: int
    default: 1800
  stage_dir:
    description:
      - One of the agent's import directories ([images] import_dirs). A file source outside
        it is copied there for the import and removed afterwards (the agent imports host
        files only from its import directories). Without it, such a source fails with the
        agent's 403 saying where to put the file.
    type: path
author: nodeagent maintainers
"""

EXAMPLES = r"""
- name: Import the Debian image
  nodeagent_image:
    api_url: https://127.0.0.1:8470
    token_file: /etc/nodeagent/admin.token
    ca_path: /etc/nodeagent/tls/agent.crt
    name: debian-12
    source: {type: url, url: https://images.example.net/debian-12.qcow2}
    format: qcow2
"""

RETURN = r"""
image:
  description: The image as the API reports it (absent when state=absent or in check mode before import).
  type: dict
  returned: success
operation:
  description: The finished import operation.
  type: dict
  returned: when an import ran
"""

import json
import os
import shutil
import tempfile
import time

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.common.text.converters import to_text
from ansible.module_utils.six.moves.urllib.error import HTTPError, URLError
from ansible.module_utils.urls import open_url

WAIT_SLICE = 30  # seconds per /wait call: the server holds the request at most this long
FINISHED = ("succeeded", "failed", "cancelled")


class ApiError(Exception):
    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


class Api:
    def __init__(self, module, token):
        self.module = module
        self.base = module.params["api_url"].rstrip("/")
        self.headers = {"Authorization": "Bearer " + token, "Accept": "application/json"}

    def call(self, method, path, body=None, timeout=60):
        headers = dict(self.headers)
        data = None
        if body is not None:
            data = json.dumps(body)
            headers["Content-Type"] = "application/json"
        try:
            resp = open_url(self.base + path, data=data, headers=headers, method=method,
                            validate_certs=self.module.params["validate_certs"],
                            ca_path=self.module.params["ca_path"], timeout=timeout)
            text = to_text(resp.read())
        except HTTPError as e:
            raise ApiError(e.code, _error_message(e)) from None
        except URLError as e:
            raise ApiError(None, f"cannot reach {self.base}: {e.reason}") from None
        return json.loads(text) if text else {}


def _error_message(e):
    try:
        err = json.loads(to_text(e.read()))["error"]
        return f"{e.code} {err.get('code')}: {err.get('message')}"
    except Exception:  # not the agent's JSON error body
        return f"{e.code} {e.reason}"


def find_image(api, name):
    images = api.call("GET", "/v1/images")
    if isinstance(images, dict):
        images = images.get("images", [])
    return next((i for i in images if i.get("name") == name), None)


def wait(api, op, timeout):
    deadline = time.monotonic() + timeout
    while op.get("status") not in FINISHED:
        left = deadline - time.monotonic()
        if left <= 0:
            raise ApiError(None, f"operation {op['id']} still {op.get('status')} after {timeout} s")
        slice_ = max(1, int(min(WAIT_SLICE, left)))
        op = api.call("GET", f"/v1/operations/{op['id']}/wait?timeout={slice_}", timeout=slice_ + 30)
    return op


def stage(module, source, stage_dir):
    """(source, staged dir or None): a file source outside ``stage_dir`` copied into a
    fresh directory under it (an OCI layout directory is copied whole)."""
    if not stage_dir or source.get("type") != "file" or not source.get("path"):
        return source, None
    real, where = os.path.realpath(source["path"]), os.path.realpath(stage_dir)
    if real.startswith(where.rstrip("/") + "/") or not os.path.exists(real):
        return source, None  # inside already, or absent: the agent says so
    staged = tempfile.mkdtemp(prefix=".ansible-", dir=stage_dir)
    dest = os.path.join(staged, os.path.basename(real))
    try:
        if os.path.isdir(real):
            shutil.copytree(real, dest, symlinks=True)
        else:
            shutil.copyfile(real, dest)
    except OSError as e:
        shutil.rmtree(staged, ignore_errors=True)
        module.fail_json(msg=f"cannot stage {real} into {stage_dir}: {e}")
    return dict(source, path=dest), staged


def read_token(module):
    if module.params["token"]:
        return module.params["token"].strip()
    try:
        with open(module.params["token_file"]) as f:
            return f.read().strip()
    except OSError as e:
        module.fail_json(msg=f"cannot read token_file {module.params['token_file']}: {e.strerror}")


def main():
    module = AnsibleModule(
        argument_spec=dict(
            api_url=dict(type="str", required=True),
            token=dict(type="str", no_log=True),
            token_file=dict(type="path"),
            ca_path=dict(type="path"),
            validate_certs=dict(type="bool", default=True),
            name=dict(type="str", required=True),
            source=dict(type="dict"),
            format=dict(type="str"),
            pool=dict(type="str"),
            state=dict(type="str", choices=["present", "absent"], default="present"),
            timeout=dict(type="int", default=1800),
            stage_dir=dict(type="path"),
        ),
        required_one_of=[("token", "token_file")],
        mutually_exclusive=[("token", "token_file")],
        required_if=[("state", "present", ("source",))],
        supports_check_mode=True,
    )
    p = module.params
    api = Api(module, read_token(module))
    try:
        image = find_image(api, p["name"])
        if p["state"] == "absent":
            if image is None:
                module.exit_json(changed=False)
            if not module.check_mode:
                api.call("DELETE", f"/v1/images/{image['id']}")
            module.exit_json(changed=True, image=image)
        if image is not None:
            module.exit_json(changed=False, image=image)
        if module.check_mode:
            module.exit_json(changed=True)
        source, staged = stage(module, p["source"], p["stage_dir"])
        try:
            body = {"name": p["name"], "source": source}
            body.update({k: p[k] for k in ("format", "pool") if p[k]})
            op = api.call("POST", "/v1/images", body)
            op = op.get("operation", op)
            op = wait(api, op, p["timeout"])
        finally:
            if staged:
                shutil.rmtree(staged, ignore_errors=True)
        if op["status"] != "succeeded":
            error = op.get("error") or {}
            module.fail_json(msg=f"importing image {p['name']} {op['status']}: "
                                 f"{error.get('message', 'no error reported')}", operation=op)
        image = find_image(api, p["name"]) or (op.get("result") or {})
        module.exit_json(changed=True, image=image, operation=op)
    except ApiError as e:
        module.fail_json(msg=str(e), status=e.status)


if __name__ == "__main__":
    main()
