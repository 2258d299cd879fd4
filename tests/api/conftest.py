"""API tests run against a real ``nodeagent serve`` (gunicorn) with fake driver kinds."""
from __future__ import annotations

import pytest

from tests.api.agentproc import AgentProcess, Api


@pytest.fixture(scope="session")
def agent(tmp_path_factory):
    proc = AgentProcess(tmp_path_factory.mktemp("agent"))
    proc.admin_token = proc.token("admin", "admin")
    proc.reader_token = proc.token("reader", "reader")
    proc.start()
    yield proc
    proc.stop()


@pytest.fixture
def admin(agent):
    return Api(agent.url, agent.admin_token)


@pytest.fixture
def reader(agent):
    return Api(agent.url, agent.reader_token)


@pytest.fixture
def anon(agent):
    return Api(agent.url)


def assert_error(r, status: int, code: str | None = None):
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"} and body["error"]["message"], body
    if code:
        assert body["error"]["code"] == code, body
    assert "Traceback" not in r.text
    return body["error"]
