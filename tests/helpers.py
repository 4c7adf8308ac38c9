"""Test helpers shared by every test file: problem factories, tolerances, comparisons, a free port."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port on the loopback interface that is free now (for torch.distributed and servers)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
