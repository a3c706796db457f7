"""Downloads never leak a file descriptor, even when the client leaves before the body."""

from __future__ import annotations

import os

import httpx
import trio

from tests.rest import make_rest_world
from tests.test_files_http import uploaded


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_abandoned_downloads_close_their_files(client: httpx.AsyncClient) -> None:
    world = await make_rest_world(client)
    done = await uploaded(client, world.tokens["alice"], b"x" * 3_000_000)
    path = f"/v1/files/{done['id']}/content"
    headers = {"Authorization": f"Bearer {world.tokens['bob']}"}
    async with client.stream("GET", path, headers=headers) as warm:
        assert warm.status_code == 200  # warm up the server's connection pool and threads
    await trio.sleep(0.1)
    before = open_fds()
    for _ in range(20):
        # read the status line, then hang up without reading the body
        async with httpx.AsyncClient(base_url=str(client.base_url)) as other:
            async with other.stream("GET", path, headers=headers) as response:
                assert response.status_code == 200
    with trio.fail_after(10):
        while open_fds() > before:  # noqa: ASYNC110 (no event for "server cleaned up")
            await trio.sleep(0.05)
    assert open_fds() <= before
