"""docs/openapi.json is what the app serves at /openapi.json (regenerate: `make openapi`)."""

from __future__ import annotations

import difflib
from pathlib import Path

from orders.api.openapi import document

COMMITTED = Path(__file__).resolve().parents[2] / "docs" / "openapi.json"


async def test_the_committed_openapi_json_is_what_the_app_serves(client):
    r = await client.get("/openapi.json")
    assert r.status_code == 200
    served = document(r.json())
    committed = COMMITTED.read_text(encoding="utf-8")
    if served != committed:
        diff = "".join(
            difflib.unified_diff(
                committed.splitlines(keepends=True), served.splitlines(keepends=True),
                "docs/openapi.json", "served /openapi.json", n=2,
            )
        )
        raise AssertionError(f"docs/openapi.json is out of date: run `make openapi`\n{diff[:4000]}")
