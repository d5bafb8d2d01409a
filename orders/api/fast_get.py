"""The cached GET /v1/orders/{id} answered below FastAPI's routing, dependency solving and
Request/Response objects: the most frequent request, and most of its cost was that machinery
(docs/PERFORMANCE.md). RequestContext (orders/observability.py) asks it first.

It answers only the common case: a canonical order id, a bearer token the verifier already
knows, a cache entry in Redis (trusted under the same breaker and replay rules as the route's)
that this caller may see, no conditional or CORS request headers. Anything else falls through,
unchanged, to the route (orders/api/orders.py), which stays the one place for every error and
edge case. What it sends is what the route sends for that entry, byte for byte: the route
answers orjson.dumps(orjson.loads(entry)), which is the entry itself (the cache writes orjson's
output), and its ETag is the entry's version (cache writes store the document's own version).
"""

from __future__ import annotations

import re
from typing import Any

import orjson
import structlog
from starlette.routing import BaseRoute
from starlette.types import Scope, Send

from orders.api.preconditions import etag
from orders.cache import Cache, order_key

PREFIX = "/v1/orders/"
# str(UUID): the form of the ids the service hands out, and of the cache keys.
_CANONICAL_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_PATH_LENGTH = len(PREFIX) + 36


class FastGet:
    """`await fast_get(scope, send)`: True when it answered, False to fall through."""

    def __init__(self, route: BaseRoute, *, cors: bool) -> None:
        self.route = route  # scope["route"] of the answer: the metrics' and log's route label
        self.cors = cors

    async def __call__(self, scope: Scope, send: Send) -> bool:
        path: str = scope["path"]
        if (
            scope["method"] != "GET"
            or len(path) != _PATH_LENGTH
            or not path.startswith(PREFIX)
            or not _CANONICAL_ID.fullmatch(path, len(PREFIX))
            or scope.get("root_path")
        ):
            return False
        authorization = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                if authorization is None:  # the first, as Request.headers.get() takes it
                    authorization = value.decode("latin-1")
            elif name.startswith(b"if-") or (name == b"origin" and self.cors):
                return False  # conditional requests, and the CORS middleware's answers: the route's
        state: dict[str, Any] | None = scope.get("state")
        res = None if state is None else state.get("res")
        if res is None or res.draining.is_set():
            return False
        caller = res.verifier.known(authorization)
        if caller is None:
            return False
        order_id = path[len(PREFIX) :]
        cache: Cache = res.cache
        raw = await cache.peek(order_key(cache.prefix, order_id))
        if raw is None:
            return False
        version, _, doc = raw.partition(b"|")
        # The document's first two members as order_doc() writes them: this order, and for a
        # customer their own id. Whatever else (a tombstone, someone else's order, another
        # shape) is the route's to answer.
        head = b'{"id":"' + order_id.encode() + b'","customer_id":'
        if not doc.startswith(head) or not version.isdigit():
            return False
        if not caller.is_admin and not doc.startswith(orjson.dumps(caller.customer_id) + b",", len(head)):
            return False
        cache.count_hit()
        structlog.contextvars.bind_contextvars(customer_id=caller.customer_id)
        scope["route"] = self.route
        # Starlette's Response(doc, media_type="application/json", headers={"ETag": ...}).
        headers = [
            (b"etag", etag(int(version)).encode()),
            (b"content-length", str(len(doc)).encode()),
            (b"content-type", b"application/json"),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": doc})
        return True
