import io
import json
import logging

from agent import log


def test_json_lines_carry_extra_fields():
    buf = io.StringIO()
    log.setup("info", "json", stream=buf)
    logging.getLogger("nodeagent.test").info("image imported", extra={"image": "abc", "bytes": 5})
    line = json.loads(buf.getvalue().strip())
    assert line["msg"] == "image imported" and line["image"] == "abc" and line["bytes"] == 5
    assert line["level"] == "info" and line["ts"].endswith("Z")
