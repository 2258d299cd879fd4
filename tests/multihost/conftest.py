"""Fixtures the multihost test modules share; each module makes its own ``cluster``
(with harness.running_cluster) since they differ in what the hosts get."""
from __future__ import annotations

import pytest

from testbed.agentproc import Api
from tests.multihost.checks import OP_TIMEOUT_S


@pytest.fixture(scope="module")
def apis(cluster):
    out = {h.name: Api(h.agent_url, h.admin_token) for h in cluster.hosts}
    for api in out.values():  # no idle keep-alive connection delays an agent's restart
        api.s.headers["Connection"] = "close"
    return out


@pytest.fixture(scope="module")
def image(apis, guest_images):
    """The test guest's disk imported on h1 as "guest"."""
    op = apis["h1"].wait(apis["h1"].post("/v1/images", json={
        "name": "guest", "source": {"type": "file", "path": guest_images["rootfs"]}}).json(), timeout=OP_TIMEOUT_S)
    assert op["status"] == "succeeded", op
    return "guest"
