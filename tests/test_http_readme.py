"""The README's route table lists exactly the REST routes the server binds."""

from __future__ import annotations

import re
from pathlib import Path

from broker.http.routes import ROUTES

README = Path(__file__).resolve().parent.parent / "README.md"
ROW = re.compile(r"^\| (GET|POST|PUT|PATCH|DELETE) \| `([^`]+)` \| `([^`]+)` \|", re.M)


def test_readme_route_table_matches_the_routes() -> None:
    listed = ROW.findall(README.read_text(encoding="utf-8"))
    assert sorted(listed) == sorted((r.method, r.path, r.operation) for r in ROUTES)
