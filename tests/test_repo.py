"""The repository's own contracts: CI runs the README's test command."""

import re

from conftest import ROOT


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Tests.*?```bash\n(.*?)```", readme, re.S).group(1)
    command = [line for line in block.splitlines() if "pytest" in line]
    assert len(command) == 1
    ci = (ROOT / ".ci" / "run").read_text()
    assert command[0].strip() in [line.strip() for line in ci.splitlines()]
    assert "torch==2.13.0" in ci and ".[test]" in ci
