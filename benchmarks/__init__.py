"""LoGo benchmarks: quality and speed, each with its own command."""

from __future__ import annotations

import json
from typing import Any


def report(summary: dict[str, Any], path: str | None) -> None:
    """Print ``summary`` as the run's last line (one JSON object); also write it to ``path``."""
    print(json.dumps(summary))
    if path:
        with open(path, "w") as f:
            json.dump(summary, f, indent=1)
