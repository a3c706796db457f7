"""Downloads never leak a file descriptor, even when the client leaves before the body."""

from __future__ import annotations

import os

import httpx
import trio

from broker.server import BrokerServer
from tests.helpers.rest import make_rest_world, uploaded


def open_fds_of(directory: str) -> int:
    """Descriptors of this process (the in-process server) open on files under `directory`."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # closed meanwhile
        count += target.startswith(directory)
    return count


async def test_download_abandoned_closes_file(
    client: httpx.AsyncClient, server: BrokerServer
) -> None:
    """Abandoned downloads close their files."""
    objects = os.path.join(server.settings.data_dir, "files", "objects")
    world = await make_rest_world(client)
    done = await uploaded(client, world.tokens["alice"], b"x" * 3_000_000)
    path = f"/v1/files/{done['id']}/content"
    headers = {"Authorization": f"Bearer {world.tokens['bob']}"}
    assert (await client.get(path, headers=headers)).content == b"x" * 3_000_000
    for _ in range(20):
        # read the status line, then hang up without reading the body
        async with httpx.AsyncClient(base_url=str(client.base_url)) as other:
            async with other.stream("GET", path, headers=headers) as response:
                assert response.status_code == 200
    # The server may still be starting some of those responses (opening the
    # file, then finding the client gone): wait until none is open for a
    # whole second. With the leak, descriptors stay open for good.
    quiet = 0
    with trio.fail_after(20):
        while quiet < 20:
            quiet = quiet + 1 if open_fds_of(objects) == 0 else 0
            await trio.sleep(0.05)
    assert open_fds_of(objects) == 0
