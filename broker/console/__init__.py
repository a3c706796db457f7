"""The web console: a page for the people who run the agents, served at `/`.

It is plain HTML, CSS and JavaScript modules in `static/`, shipped inside the
package (no build step, nothing to install in the browser). The page signs in
with a workspace key and then uses only the public surface every client has:
the REST routes, the observer socket `/v1/ws` and `/metrics`. So the console
adds no privilege and no server state, and works behind whichever gateway
process answers a request.

The files are read once, when the routes are made, into a table keyed by
file name: a request names one entry of that table or gets a 404, so no
request path ever reaches the filesystem (no traversal to guard against).
Every answer carries strict headers: a Content-Security-Policy that allows
scripts, styles and connections from this origin only (no inline script, so
an injected `<script>` would not run even if markup slipped through), no
framing, no referrer (the page's URL may carry `#key=` for a moment).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from broker.http.errors import encode_error

INDEX_PATH = "/"
STATIC_PATH = "/console/{name}"
INDEX_FILE = "index.html"

# 'self' covers the observer socket too (ws:/wss: of this host, CSP level 3).
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cross-Origin-Opener-Policy": "same-origin",
    # Revalidate each time (cheap: an ETag), so a daemon upgrade is seen at once.
    "Cache-Control": "no-cache",
}
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}


@dataclass(frozen=True)
class StaticFile:
    body: bytes
    content_type: str
    etag: str


def load_static() -> dict[str, StaticFile]:
    """The console's files by name, as the package ships them.

    Raises ValueError for a file whose type has no content type here (so a
    new kind of file is a decision, not a guess by the browser).
    """
    files: dict[str, StaticFile] = {}
    for entry in resources.files("broker.console").joinpath("static").iterdir():
        if not entry.is_file():
            continue
        suffix = "." + entry.name.rsplit(".", 1)[-1]
        content_type = CONTENT_TYPES.get(suffix)
        if content_type is None:
            raise ValueError(f"console file {entry.name!r} has no known content type")
        body = entry.read_bytes()
        etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
        files[entry.name] = StaticFile(body, content_type, etag)
    return files


def _answer(request: Request, file: StaticFile) -> Response:
    headers = {**SECURITY_HEADERS, "ETag": file.etag}
    if file.etag in request.headers.get("if-none-match", ""):
        return Response(status_code=304, headers=headers)
    return Response(file.body, media_type=file.content_type, headers=headers)


def console_routes() -> list[BaseRoute]:
    """`GET /` (the page) and `GET /console/{name}` (its scripts and styles)."""
    files = load_static()
    index = files[INDEX_FILE]

    async def page(request: Request) -> Response:
        return _answer(request, index)

    async def static(request: Request) -> Response:
        file = files.get(request.path_params["name"])
        if file is None:
            return Response(
                encode_error("not_found", f"no console file {request.url.path}"),
                status_code=404, media_type="application/json", headers=SECURITY_HEADERS,
            )
        return _answer(request, file)

    return [
        Route(INDEX_PATH, page, methods=["GET"]),
        Route(STATIC_PATH, static, methods=["GET"]),
    ]
