"""Downloads: HEAD, byte ranges, ETag and conditional requests, and no file descriptor
leaked when the client leaves before the body."""

from __future__ import annotations

import email.parser
import email.policy
import os

import httpx
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from broker.http.files import MAX_RANGES, byte_ranges
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


# 40 copies of every byte value: any slice shows where it came from.
DATA = bytes(range(256)) * 40
SIZE = len(DATA)


@pytest.fixture
async def download(client: httpx.AsyncClient) -> tuple[str, dict[str, str]]:
    """The content path of an uploaded DATA and the headers of a reader allowed to get it."""
    world = await make_rest_world(client)
    done = await uploaded(client, world.tokens["alice"], DATA)
    return f"/v1/files/{done['id']}/content", {"Authorization": f"Bearer {world.tokens['bob']}"}


def byteranges(response: httpx.Response) -> list[tuple[str, bytes]]:
    """The parts of a multipart/byteranges body: (Content-Range, bytes) each."""
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + response.headers["content-type"].encode() + b"\r\n\r\n"
        + response.content)
    return [(part["content-range"], part.get_payload(decode=True))
            for part in message.iter_parts()]


async def test_download_range_single(
    client: httpx.AsyncClient, download: tuple[str, dict[str, str]]
) -> None:
    """One range answers 206 with its bytes and Content-Range: first-last, suffix, open end,
    an end past the file cut to it."""
    path, auth = download
    for asked, first, last in [("bytes=0-9", 0, 9), ("bytes=-5", SIZE - 5, SIZE - 1),
                               ("bytes=10230-", 10230, SIZE - 1),
                               ("bytes=10000-99999", 10000, SIZE - 1),
                               ("BYTES = 7-7", 7, 7), ("bytes=-99999", 0, SIZE - 1)]:
        response = await client.get(path, headers={**auth, "Range": asked})
        assert response.status_code == 206, (asked, response.text)
        assert response.headers["content-range"] == f"bytes {first}-{last}/{SIZE}", asked
        assert response.content == DATA[first:last + 1], asked
        assert response.headers["content-length"] == str(last + 1 - first)


async def test_download_head(
    client: httpx.AsyncClient, download: tuple[str, dict[str, str]]
) -> None:
    """HEAD answers the headers of the GET, with no body, for the whole file and a range."""
    path, auth = download
    whole = await client.head(path, headers=auth)
    assert whole.status_code == 200
    assert whole.content == b""
    assert whole.headers["content-length"] == str(SIZE)
    assert whole.headers["accept-ranges"] == "bytes"
    assert whole.headers["etag"] == (await client.get(path, headers=auth)).headers["etag"]
    part = await client.head(path, headers={**auth, "Range": "bytes=100-199"})
    assert part.status_code == 206
    assert part.content == b""
    assert part.headers["content-range"] == f"bytes 100-199/{SIZE}"
    assert part.headers["content-length"] == "100"


async def test_download_multiple_and_overlapping_ranges(
    client: httpx.AsyncClient, download: tuple[str, dict[str, str]]
) -> None:
    """Overlapping or adjacent ranges are merged, a range past the end is dropped from a set,
    and what is left goes out as multipart/byteranges in order."""
    path, auth = download
    response = await client.get(path, headers={**auth, "Range": "bytes=20-29,0-4,2-9,-3"})
    assert response.status_code == 206
    assert response.headers["content-type"].startswith("multipart/byteranges; boundary=")
    assert byteranges(response) == [(f"bytes 0-9/{SIZE}", DATA[0:10]),
                                    (f"bytes 20-29/{SIZE}", DATA[20:30]),
                                    (f"bytes {SIZE - 3}-{SIZE - 1}/{SIZE}", DATA[-3:])]
    merged = await client.get(path, headers={**auth, "Range": "bytes=0-4,5-9,3-6"})
    assert merged.status_code == 206
    assert merged.headers["content-range"] == f"bytes 0-9/{SIZE}"
    assert merged.content == DATA[:10]
    dropped = await client.get(path, headers={**auth, "Range": f"bytes=0-0,{SIZE}-{SIZE + 9}"})
    assert dropped.status_code == 206
    assert dropped.headers["content-range"] == f"bytes 0-0/{SIZE}"
    assert dropped.content == DATA[:1]


@pytest.mark.parametrize("asked", [
    f"bytes={SIZE}-", f"bytes={SIZE + 5}-{SIZE + 9}", "bytes=-0", f"bytes={SIZE}-,-0",
])
async def test_download_range_not_satisfiable(
    client: httpx.AsyncClient, download: tuple[str, dict[str, str]], asked: str
) -> None:
    """Only bytes past the end: 416 range_not_satisfiable with `bytes */SIZE`."""
    path, auth = download
    response = await client.get(path, headers={**auth, "Range": asked})
    assert response.status_code == 416
    assert response.json()["error"]["code"] == "range_not_satisfiable"
    assert response.headers["content-range"] == f"bytes */{SIZE}"


@pytest.mark.parametrize("asked", [
    "bytes=9-3", "items=0-1", "bytes=abc", "bytes", "bytes=", "bytes=1_0-20", "bytes=+1-2",
    "bytes=\u0663-5", "bytes=--5", "bytes=0-1-2", ",".join(["bytes=0-0", *["2-2"] * 16]),
    "bytes=" + "1" * 5000 + "-", "bytes=0-" + "9" * 20, "bytes=-" + "9" * 5000,
])
async def test_download_range_invalid_ignored(
    client: httpx.AsyncClient, download: tuple[str, dict[str, str]], asked: str
) -> None:
    """A Range that does not parse, or asks for more than 16 ranges, is ignored: the
    whole file, 200."""
    path, auth = download
    response = await client.get(path, headers={**auth, "Range": asked.encode()})
    assert response.status_code == 200, response.text
    assert "content-range" not in response.headers
    assert response.content == DATA


async def test_download_etag_conditional(
    client: httpx.AsyncClient, download: tuple[str, dict[str, str]]
) -> None:
    """If-None-Match with the ETag (strong, weak, in a list, or *) answers 304 and no body;
    If-Range with another tag sends the whole file; another file has another tag."""
    path, auth = download
    etag = (await client.get(path, headers=auth)).headers["etag"]
    assert etag.startswith('"') and etag.endswith('"')
    for matching in (etag, f"W/{etag}", f'"other", {etag}', "*"):
        response = await client.get(path, headers={**auth, "If-None-Match": matching})
        assert response.status_code == 304, matching
        assert response.content == b""
        assert response.headers["etag"] == etag
    fresh = await client.get(path, headers={**auth, "If-None-Match": '"other"'})
    assert (fresh.status_code, fresh.content) == (200, DATA)
    ranged = await client.get(path, headers={**auth, "Range": "bytes=0-1", "If-Range": etag})
    assert (ranged.status_code, ranged.content) == (206, DATA[:2])
    stale = await client.get(path, headers={**auth, "Range": "bytes=0-1",
                                            "If-Range": '"other"'})
    assert (stale.status_code, stale.content) == (200, DATA)
    world = await make_rest_world(client, name="other")
    again = await uploaded(client, world.tokens["alice"], DATA)
    headers = {"Authorization": f"Bearer {world.tokens['alice']}"}
    other = await client.get(f"/v1/files/{again['id']}/content", headers=headers)
    assert other.content == DATA
    assert other.headers["etag"] != etag


Spec = tuple[int | None, int | None]


@given(size=st.integers(0, 40), specs=st.lists(
    st.tuples(st.none() | st.integers(0, 50), st.none() | st.integers(0, 50)),
    min_size=1, max_size=MAX_RANGES + 2))
def test_byte_ranges_cover_exactly_what_was_asked(size: int, specs: list[Spec]) -> None:
    """byte_ranges against a model: the bytes each spec names within the file, as sorted
    ranges with gaps between them; None for a header to ignore; [] when nothing is left."""
    header = "bytes=" + ", ".join(
        f"{'' if first is None else first}-{'' if last is None else last}"
        for first, last in specs)
    ranges = byte_ranges(header, size)
    if len(specs) > MAX_RANGES or any(
            (first is None and last is None)
            or (first is not None and last is not None and last < first)
            for first, last in specs):
        assert ranges is None
        return
    wanted: set[int] = set()
    for first, last in specs:
        if first is None:
            assert last is not None
            wanted.update(range(max(0, size - last), size))
        else:
            wanted.update(range(first, size if last is None else min(last + 1, size)))
    assert ranges is not None
    covered = [i for first, last in ranges for i in range(first, last + 1)]
    assert covered == sorted(wanted)
    assert all(ranges[i][1] + 1 < ranges[i + 1][0] for i in range(len(ranges) - 1))
