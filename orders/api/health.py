"""Liveness, readiness and metrics."""

from __future__ import annotations

import asyncio

import orjson
from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from orders.api.openapi import PROBLEM, RETRY_AFTER
from orders.deps import ProbeRes
from orders.errors import PROBLEM_BASE, problem_response
from orders.observability import POOL_IN_USE, POOL_SIZE

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
async def readyz(res: ProbeRes) -> Response:
    postgres = "ok"
    try:
        async with asyncio.timeout(READY_PG_TIMEOUT_S):
            async with res.pool.acquire() as conn:
                await conn.fetchval("SELECT 1")
    except Exception:
        postgres = "down"
    if not res.cache.enabled:
        redis = "disabled"
    else:
        redis = "ok" if await res.cache.ping() else "down"
    if res.draining.is_set() or postgres != "ok":
        detail = "draining" if res.draining.is_set() else "PostgreSQL is unreachable"
        body = {
            "type": PROBLEM_BASE + "unavailable",
            "title": "Service unavailable",
            "status": 503,
            "detail": detail,
            "postgres": postgres,
            "redis": redis,
        }
        return problem_response(503, body, {"Retry-After": "5"})
    body_ok = {"status": "ready", "postgres": postgres, "redis": redis}
    return Response(orjson.dumps(body_ok), media_type="application/json")


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(res: ProbeRes) -> Response:
    POOL_SIZE.set(res.pool.get_size())
    POOL_IN_USE.set(res.pool.get_size() - res.pool.get_idle_size())
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
