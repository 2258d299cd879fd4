"""The layers' import rules, read from the source with ast (function-level imports too).

- The drivers (storage/, hypervisor/, containers/) sit below the agent: of `agent` they
  may import only the shared kernel, `agent.errors` and `agent.state`.
- testbed/ (launchers used by tests, benches and scripts) never imports pytest, so
  benches and scripts/build-busybox-image run without it.
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DRIVERS = ("storage", "hypervisor", "containers")
KERNEL = {"agent.errors", "agent.state"}


def python_files(package: str):
    for d, _, files in os.walk(os.path.join(REPO, package)):
        for f in sorted(files):
            if f.endswith(".py"):
                yield os.path.join(d, f)


def imported_modules(path: str):
    """(line, module) for every import in ``path``; `from a import b` yields a.b (b may be
    a module) and `from . import x` is resolved against the file's package."""
    rel = os.path.relpath(path, REPO)[:-3].split(os.sep)
    package = rel[:-1]
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)] if node.level > 1 else package
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            for alias in node.names:
                yield node.lineno, f"{module}.{alias.name}"


def agent_import_outside_kernel(module: str) -> bool:
    if module != "agent" and not module.startswith("agent."):
        return False
    return not any(module == k or module.startswith(k + ".") for k in KERNEL)


def test_drivers_import_only_the_shared_kernel_of_agent():
    found = []
    for package in DRIVERS:
        for path in python_files(package):
            for line, module in imported_modules(path):
                if agent_import_outside_kernel(module):
                    found.append(f"{os.path.relpath(path, REPO)}:{line}: {module}")
    assert found == [], "drivers may import only agent.errors and agent.state of agent:\n" + "\n".join(found)


def test_the_rule_sees_every_form_of_import(tmp_path):
    src = ("import agent.config\nfrom agent import models\nfrom agent.errors import NotFound\n"
           "def f():\n    from agent.services import instances\n    import agent.state\n")
    p = tmp_path / "m.py"
    p.write_text(src)
    bad = [m for _, m in imported_modules(str(p)) if agent_import_outside_kernel(m)]
    assert bad == ["agent.config", "agent.models", "agent.services.instances"]


def test_testbed_does_not_need_pytest():
    """Import every testbed module in a Python that cannot import pytest."""
    modules = sorted(os.path.basename(p)[:-3] for p in python_files("testbed")
                     if not p.endswith("__init__.py"))
    code = ("import sys\n"
            "class NoPytest:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] in ('pytest', '_pytest'):\n"
            "            raise ImportError('testbed must not import ' + name)\n"
            "sys.meta_path.insert(0, NoPytest())\n"
            + "".join(f"import testbed.{m}\n" for m in modules))
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert len(modules) >= 7, modules
