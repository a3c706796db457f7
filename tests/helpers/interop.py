"""The Node interop setup: the Relaycast SDK and the MCP Inspector CLI installed under
tests/interop, and a mark that skips where node is missing."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import trio

INTEROP = Path(__file__).parent.parent / "interop"


NODE = shutil.which("node")


# npm ci fetches three packages; the flow itself takes well under a second.
INSTALL_DEADLINE_S = 300


async def ensure_sdk_installed(package: str = "@relaycast/sdk") -> None:
    """Install tests/interop's packages from the lock file unless `package` is there."""
    if (INTEROP / "node_modules" / package / "package.json").exists():
        return
    npm = shutil.which("npm")
    if npm is None:
        pytest.fail("node is installed but npm is not: cannot install tests/interop/node_modules "
                    "(run `make interop-deps` on a machine with npm)")
    with trio.fail_after(INSTALL_DEADLINE_S):
        await trio.run_process(
            [npm, "ci", "--no-audit", "--no-fund"], cwd=INTEROP, capture_stdout=True,
            capture_stderr=True,
        )


needs_node = pytest.mark.skipif(NODE is None, reason="node is not installed")
