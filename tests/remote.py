"""Markers for tests that run both in-process and against a live `logo serve` (conftest.py).

``@both_modes`` parametrises the ``mode`` fixture with "local" and "remote"; the remote case may
open sockets, to 127.0.0.1 only.
"""

from __future__ import annotations

import pytest

REMOTE = pytest.param(
    "remote", marks=[pytest.mark.enable_socket, pytest.mark.allow_hosts(["127.0.0.1"])]
)
both_modes = pytest.mark.parametrize("mode", ["local", REMOTE], indirect=True)
