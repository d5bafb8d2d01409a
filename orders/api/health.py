"""Liveness, readiness and metrics."""

from __future__ import annotations

import asyncio

import orjson
from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from orders.api.openapi import PROBLEM, RETRY_AFTER
from orders.api.problems import error_response
from orders.deps import ProbeResources
from orders.errors import Unavailable
from orders.observability import metrics_text, set_pool_gauges
from orders.resources import Resources

router = APIRouter(tags=["operations"])

READY_PG_TIMEOUT_S = 1.0


@router.get("/healthz", summary="Liveness: 200 while the process runs (no I/O)")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


READY_SCHEMA = {
    "type": "object",
    "required": ["status", "postgres", "redis"],
    "properties": {
        "status": {"type": "string", "enum": ["ready"]},
        "postgres": {"type": "string", "enum": ["ok"]},
        "redis": {"type": "string", "enum": ["ok", "down", "disabled"]},
    },
}


@router.get(
    "/readyz",
    summary="Readiness: PostgreSQL reachable and not draining; Redis down is only degraded",
    responses={
        200: {"description": "Ready", "content": {"application/json": {"schema": READY_SCHEMA}}},
        503: {
            "description": "Not ready: PostgreSQL unreachable, or draining after SIGTERM",
            "content": PROBLEM,
            "headers": RETRY_AFTER,
        },
    },
)
async def readyz(res: ProbeResources) -> Response:
    postgres = "ok" if await _postgres_ok(res) else "down"
    if not res.cache.enabled:
        redis = "disabled"
    else:
        redis = "ok" if await res.cache.ping() else "down"
    if res.draining.is_set() or postgres != "ok":
        detail = "draining" if res.draining.is_set() else "PostgreSQL is unreachable"
        return error_response(Unavailable(detail, retry_after=5, postgres=postgres, redis=redis))
    body_ok = {"status": "ready", "postgres": postgres, "redis": redis}
    return Response(orjson.dumps(body_ok), media_type="application/json")


async def _postgres_ok(res: Resources) -> bool:
    """A pooled connection answers `SELECT 1` within READY_PG_TIMEOUT_S. When none is
    free in time because every one is busy (a full pool under load), PostgreSQL is
    serving them: ready (docs/API.md: 503 while PostgreSQL is unreachable, not while busy)."""
    pool = res.pool
    try:
        async with asyncio.timeout(READY_PG_TIMEOUT_S):
            conn = await pool.acquire()
    except TimeoutError:
        return pool.get_size() >= pool.get_max_size() and pool.get_idle_size() == 0
    except Exception:
        return False
    try:
        async with asyncio.timeout(READY_PG_TIMEOUT_S):
            await conn.fetchval("SELECT 1")
        return True
    except Exception:
        return False
    finally:
        await pool.release(conn)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(res: ProbeResources) -> Response:
    set_pool_gauges(res.pool)
    return Response(metrics_text(), media_type=CONTENT_TYPE_LATEST)
