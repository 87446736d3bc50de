"""The README's two commands are the ones CI runs."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).parent.parent


def _bash_blocks(text: str) -> list[str]:
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", text, re.DOTALL)]


def test_ci_runs_the_readme_commands():
    blocks = _bash_blocks((ROOT / "README.md").read_text())
    setup_and_demo, tests = blocks[0], blocks[1]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "torch==2.13.0" in setup_and_demo and "torch==2.13.0" in tests
    install, _, test_command = tests.rpartition(" && ")
    assert install in ci
    assert f"\n{test_command}\n" in ci
