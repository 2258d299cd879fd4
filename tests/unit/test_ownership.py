"""One writer per record: only agent/services/records.py runs SQL on the ``instances``
table, and no module reaches into another's privates to change instance records."""
from __future__ import annotations

import re
from pathlib import Path

import agent

AGENT = Path(agent.__file__).parent
OWNER = AGENT / "services" / "records.py"
# SQL naming the table: SELECT ... FROM / JOIN, INSERT [OR ...] INTO, UPDATE, DELETE FROM,
# CREATE/ALTER/DROP TABLE [IF [NOT] EXISTS]. Upper-case keywords, as the code writes SQL.
TABLE_SQL = re.compile(r"\b(?:FROM|JOIN|INTO|UPDATE|TABLE(?:\s+IF(?:\s+NOT)?\s+EXISTS)?)\s+[\"'`\[]?instances\b")
# what used to be called from outside the instance service to write records
PRIVATE_CALL = re.compile(r"\binstances\._(?:update|changed|spec|destroy|instance_dir|release_address|"
                          r"mark_cleanup)\b")


def _sources():
    return sorted(p for p in AGENT.rglob("*.py") if "__pycache__" not in p.parts)


def test_the_pattern_finds_the_statements_it_is_meant_to():
    for sql in ("SELECT * FROM instances WHERE id=?", "INSERT INTO instances(id) VALUES(?)",
                "UPDATE instances SET spec=?", "DELETE FROM instances WHERE id=?",
                'SELECT x FROM "instances"', "INSERT OR REPLACE INTO instances VALUES(1)",
                "SELECT count(*) AS n FROM instances", "CREATE TABLE IF NOT EXISTS instances (",
                "SELECT a FROM operations JOIN instances ON 1"):
        assert TABLE_SQL.search(sql), sql
    for text in ("GET /v1/instances", "the instances table", "removed from the instances"):
        assert not TABLE_SQL.search(text), text


def test_only_the_records_module_runs_sql_on_instances():
    assert OWNER.exists()
    offenders = []
    for path in _sources():
        if path == OWNER:
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if TABLE_SQL.search(line):
                offenders.append(f"{path.relative_to(AGENT.parent)}:{n}: {line.strip()}")
    assert offenders == [], "SQL on `instances` outside agent/services/records.py:\n" + "\n".join(offenders)


def test_the_records_module_does_run_it():
    assert TABLE_SQL.search(OWNER.read_text())  # the scan above looks at the right thing


def test_no_module_calls_the_instance_services_privates():
    offenders = [f"{p.relative_to(AGENT.parent)}:{n}: {line.strip()}"
                 for p in _sources() for n, line in enumerate(p.read_text().splitlines(), 1)
                 if PRIVATE_CALL.search(line)]
    assert offenders == [], "\n".join(offenders)
