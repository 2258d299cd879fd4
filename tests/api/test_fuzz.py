"""Schema fuzz: schemathesis against /v1/openapi.json of a real server: no 5xx, no spec violations."""
import shutil
import subprocess
import sys
from pathlib import Path

from testbed.agentproc import AgentProcess

MAX_EXAMPLES = 15  # per operation: bounded to keep CI time low (about 10 s here)


def test_schemathesis_finds_no_500s_and_no_spec_violations(tmp_path):
    st = shutil.which("schemathesis") or str(Path(sys.executable).parent / "schemathesis")
    assert Path(st).exists(), "schemathesis missing: pip install -e .[test]"
    agent = AgentProcess(tmp_path / "fuzz", pool_kind="local")
    token = agent.token("fuzz", "admin")
    agent.start()
    config = tmp_path / "schemathesis.toml"  # a body over the size limit is refused with 413 too
    config.write_text("[checks.negative_data_rejection]\nexpected-statuses = "
                      '[400, 401, 403, 404, 405, 406, 409, 413, 415, 422, 428, 429, "5xx"]\n'
                      # a volume never shrinks: a smaller size than the volume's is 422 (the contract)
                      '[[operations]]\ninclude-path = "/v1/volumes/{id}"\ninclude-method = "PATCH"\n'
                      "[operations.checks.positive_data_acceptance]\n"
                      "expected-statuses = [200, 401, 403, 404, 409, 422]\n"
                      # an upload is a backup's tar with checksums that match: random bytes are 422
                      '[[operations]]\ninclude-name = "POST /v1/backups"\n'
                      "[operations.checks.positive_data_acceptance]\n"
                      "expected-statuses = [201, 401, 403, 404, 409, 422]\n"
                      # an evacuation needs configured peers (this agent has none): a valid body is 422 here
                      '[[operations]]\ninclude-name = "POST /v1/host/evacuate"\n'
                      "[operations.checks.positive_data_acceptance]\n"
                      "expected-statuses = [202, 401, 403, 404, 409, 422]\n")
    try:
        r = subprocess.run(
            [st, "--config-file", str(config), "run", agent.url + "/v1/openapi.json",
             "-H", f"Authorization: Bearer {token}",
             "--checks", "all", "--max-examples", str(MAX_EXAMPLES), "--phases", "examples,coverage,fuzzing",
             "--exclude-path", "/v1/events",  # an endless stream by design; covered in test_instances
             "--seed", "1", "--no-color"],
            capture_output=True, text=True, timeout=300, cwd=tmp_path)  # its cache stays out of the repo
        assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
        assert "unhandled error" not in agent.log.read_text()
    finally:
        assert agent.stop() == 0
