"""/docs and /redoc load everything from the service itself (docs/API.md, Operations):
no CDN, so they work on an offline cluster."""

from __future__ import annotations

from html.parser import HTMLParser
from urllib.parse import urlsplit

import pytest

CONTENT_TYPES = {
    ".js": ("text/javascript", "application/javascript"),
    ".css": ("text/css",),
    ".png": ("image/png",),
    ".json": ("application/json",),
}


class _Links(HTMLParser):
    """Every URL a page names: src, href and ReDoc's spec-url."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.urls += [value for name, value in attrs if name in ("src", "href", "spec-url") and value]


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
async def test_docs_pages_load_only_local_assets(client, page):
    r = await client.get(page)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "http://" not in r.text and "https://" not in r.text  # not even in inline script
    parser = _Links()
    parser.feed(r.text)
    scripts = [u for u in parser.urls if u.endswith(".js")]
    assert scripts and any(u.endswith(".css") or u.endswith(".png") for u in parser.urls), parser.urls
    for url in parser.urls:
        parts = urlsplit(url)
        assert not parts.scheme and not parts.netloc and url.startswith("/"), url
        asset = await client.get(url)
        assert asset.status_code == 200, url
        suffix = parts.path[parts.path.rfind(".") :]
        assert asset.headers["content-type"].split(";")[0] in CONTENT_TYPES[suffix], (url, asset.headers)
        assert len(asset.content) > 1000, url  # the real file, not an error page


async def test_docs_pages_are_not_in_the_openapi_description(client):
    paths = (await client.get("/openapi.json")).json()["paths"]
    assert not [p for p in paths if p.startswith(("/docs", "/redoc"))]


async def test_a_missing_asset_is_a_404_problem(client):
    r = await client.get("/docs/assets/nope.js")
    assert r.status_code == 404 and r.headers["content-type"] == "application/problem+json"
