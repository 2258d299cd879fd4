"""One writer per record: only agent/services/volumes.py runs SQL on the ``volumes`` table."""
from __future__ import annotations

import re
from pathlib import Path

import agent

AGENT = Path(agent.__file__).parent
OWNER = AGENT / "services" / "volumes.py"
TABLE_SQL = re.compile(r"\b(?:FROM|JOIN|INTO|UPDATE|TABLE(?:\s+IF(?:\s+NOT)?\s+EXISTS)?)\s+[\"'`\[]?volumes\b")


def test_only_the_volume_service_runs_sql_on_volumes():
    assert TABLE_SQL.search(OWNER.read_text()), "the scan looks at the right thing"
    offenders = [f"{p.relative_to(AGENT.parent)}:{n}: {line.strip()}"
                 for p in sorted(AGENT.rglob("*.py")) if p != OWNER and "__pycache__" not in p.parts
                 for n, line in enumerate(p.read_text().splitlines(), 1) if TABLE_SQL.search(line)]
    assert offenders == [], "SQL on `volumes` outside agent/services/volumes.py:\n" + "\n".join(offenders)
