"""Entity tags of orders (their version) and the If-Match header (RFC 9110, 13.1.1)."""

from __future__ import annotations


def etag(version: int) -> str:
    return f'"{version}"'


def parse_if_match(header: str | None) -> frozenset[int] | None:
    """The versions an If-Match header accepts; None: any (no header, or `*`). Weak tags
    (W/"3") count as their version; a tag that is no version of ours matches nothing."""
    if header is None:
        return None
    versions = set()
    for tag in header.split(","):
        tag = tag.strip()
        if tag == "*":
            return None
        tag = tag.removeprefix("W/")
        digits = tag[1:-1]
        if len(tag) > 2 and tag[0] == tag[-1] == '"' and digits.isascii() and digits.isdigit():
            if digits == str(int(digits)):  # "03" is not the tag of version 3
                versions.add(int(digits))
    return frozenset(versions)
