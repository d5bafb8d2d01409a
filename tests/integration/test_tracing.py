"""OpenTelemetry tracing against a real OTLP/HTTP receiver (orders/tracing.py).

`orders serve` runs as a process with the standard OTEL_* variables pointing at an
OTLP/HTTP endpoint started here, which decodes what the SDK's exporter posts
(ExportTraceServiceRequest, protobuf). With the variables unset, nothing is instrumented.
"""

from __future__ import annotations

import gzip
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import asyncpg
import grpc
import httpx
import pytest
import structlog
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from orders import tracing
from orders.dev.process import free_port
from tests.conftest import ADMIN, auth, make_product, order_body, place, wait_for
from tests.server import ServerProcess

SERVER = Span.SpanKind.SPAN_KIND_SERVER


class OtlpReceiver:
    """An OTLP/HTTP trace endpoint: POST /v1/traces with a protobuf body; keeps every span."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                if self.path != "/v1/traces" or self.headers.get("Content-Type") != "application/x-protobuf":
                    self.send_error(404)
                    return
                request = ExportTraceServiceRequest()
                request.ParseFromString(body)
                receiver.add(request)
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def add(self, request: ExportTraceServiceRequest) -> None:
        for rs in request.resource_spans:
            resource = {a.key: a.value.string_value for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    attributes = {a.key: _value(a.value) for a in s.attributes}
                    with self.lock:
                        self.spans.append({
                            "name": s.name,
                            "trace_id": s.trace_id.hex(),
                            "span_id": s.span_id.hex(),
                            "parent": s.parent_span_id.hex() or None,
                            "kind": s.kind,
                            "service": resource.get("service.name"),
                            "instance": resource.get("service.instance.id"),
                            "attributes": attributes,
                        })  # fmt: skip

    def trace(self, trace_id: str) -> list[dict[str, Any]]:
        with self.lock:
            return [s for s in self.spans if s["trace_id"] == trace_id]

    def __enter__(self) -> OtlpReceiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


class OtlpGrpcReceiver(OtlpReceiver):
    """The same over OTLP/gRPC: the TraceService's Export."""

    def __init__(self) -> None:
        self.spans = []
        self.lock = threading.Lock()
        receiver = self

        class Service(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request: ExportTraceServiceRequest, context: Any) -> ExportTraceServiceResponse:
                receiver.add(request)
                return ExportTraceServiceResponse()

        self.grpc = grpc.server(ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Service(), self.grpc)
        self.url = f"http://127.0.0.1:{self.grpc.add_insecure_port('127.0.0.1:0')}"

    def __enter__(self) -> OtlpGrpcReceiver:
        self.grpc.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.grpc.stop(grace=None)


def _value(v: Any) -> Any:
    return getattr(v, v.WhichOneof("value")) if v.WhichOneof("value") else None


@pytest.fixture(scope="module")
def traced(
    base_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ServerProcess, OtlpReceiver]]:
    """`orders serve` exporting to the receiver, a span batch every 100 ms."""
    with OtlpReceiver() as receiver:
        server = ServerProcess(
            base_env, tmp_path_factory.mktemp("traced"),
            OTEL_EXPORTER_OTLP_ENDPOINT=receiver.url,
            OTEL_SERVICE_NAME="orders-under-test",
            OTEL_BSP_SCHEDULE_DELAY="100",
            ORDERS_LOG_LEVEL="info",
        )  # fmt: skip
        with server:
            yield server, receiver


def _server_span(receiver: OtlpReceiver, route: str, after: int = 0) -> dict[str, Any]:
    """The newest server span of `route` among the spans received from index `after` on."""
    with receiver.lock:
        spans = [
            s for s in receiver.spans[after:] if s["kind"] == SERVER and s["attributes"].get("http.route") == route
        ]
    return spans[-1] if spans else {}


def _product(c: httpx.Client) -> str:
    """A new product (a server's, over HTTP): its sku."""
    sku = f"T-{uuid.uuid4().hex[:12]}"
    r = c.put(f"/v1/products/{sku}", headers=ADMIN, json={"name": "Mug", "unit_price": 100, "currency": "USD", "stock": 5})
    assert r.status_code == 201, r.text
    return sku


def _order(c: httpx.Client, customer: str, sku: str) -> str:
    """An order of one `sku` placed by `customer`: its id."""
    r = c.post(
        "/v1/orders",
        headers={**auth(customer), "Idempotency-Key": uuid.uuid4().hex},
        json=order_body((sku, 1)),
    )
    assert r.status_code == 201, r.text
    return r.json()["id"]


@pytest.mark.slow
async def test_an_order_and_its_deliveries_are_one_trace(traced: tuple[ServerProcess, OtlpReceiver]) -> None:
    server, receiver = traced
    with httpx.Client(base_url=server.url, timeout=10) as c:
        sku = _product(c)
        start = len(receiver.spans)
        order_id = _order(c, "cust-traced", sku)

    request = await wait_for(lambda: _server_span(receiver, "/v1/orders", start))
    trace_id = request["trace_id"]
    assert request["service"] == "orders-under-test" and request["parent"] is None

    def deliveries() -> list[dict[str, Any]]:
        spans = receiver.trace(trace_id)
        return [s for s in spans if s["name"] in ("smtp send", "audit")] if len(spans) else []

    sent = await wait_for(lambda: len(deliveries()) == 2 and deliveries())
    # Both deliveries (after the response, from the relay's tasks) are children of the request.
    assert sorted(s["name"] for s in sent) == ["audit", "smtp send"]
    assert all(s["parent"] == request["span_id"] for s in sent)
    assert all(s["attributes"]["orders.order.id"] == order_id for s in sent)
    spans = receiver.trace(trace_id)
    systems = {s["attributes"].get("db.system") or s["attributes"].get("db.system.name") for s in spans}
    assert {"postgresql", "redis"} <= systems, systems
    # The outbox rows carry the request's context in the database, for any replica.
    conn = await asyncpg.connect(server.env["ORDERS_DATABASE_URL"])
    try:
        stored = await conn.fetch(
            "SELECT trace_context->>'traceparent' AS tp FROM outbox WHERE order_id = $1", uuid.UUID(order_id)
        )
    finally:
        await conn.close()
    assert [row["tp"][:-3] for row in stored] == [f"00-{trace_id}-{request['span_id']}"] * 2

    # Log lines written inside a span carry its ids: the request's access line, the audit entry.
    def lines() -> list[dict[str, Any]]:
        return [
            line for line in server.logs()
            if (line.get("order_id") == order_id and line.get("event") == "audit")
            or (line.get("event") == "request" and line.get("route") == "/v1/orders" and line.get("trace_id") == trace_id)
        ]  # fmt: skip

    found = await wait_for(lambda: len(lines()) == 2 and lines())
    assert {line["trace_id"] for line in found} == {trace_id}
    audit_span = next(s for s in sent if s["name"] == "audit")
    assert {line["span_id"] for line in found} == {request["span_id"], audit_span["span_id"]}


@pytest.mark.slow
async def test_an_incoming_traceparent_is_continued(traced: tuple[ServerProcess, OtlpReceiver]) -> None:
    server, receiver = traced
    trace_id, parent = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    with httpx.Client(base_url=server.url, timeout=10) as c:
        r = c.get("/v1/products", headers={"traceparent": f"00-{trace_id}-{parent}-01"})
        assert r.status_code == 200, r.text
    [line] = await wait_for(lambda: [x for x in server.logs() if x.get("trace_id") == trace_id])
    assert line["event"] == "request"
    spans = await wait_for(lambda: receiver.trace(trace_id))
    [request] = [s for s in spans if s["parent"] == parent]
    assert request["attributes"]["http.route"] == "/v1/products"


@pytest.mark.slow
async def test_a_delivery_by_another_replica_joins_the_request_trace(
    base_env: dict[str, str], isolated_db: str, tmp_path
) -> None:
    """Replica A takes the order while SMTP is down and stops; replica B delivers the email
    later, in a span of A's request trace (the context stored with the outbox row)."""
    with OtlpReceiver() as receiver:
        otel = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url, "OTEL_BSP_SCHEDULE_DELAY": "100"}
        a = ServerProcess(
            base_env, tmp_path, "a", ORDERS_DATABASE_URL=isolated_db, ORDERS_SMTP_PORT=str(free_port()),
            ORDERS_SHUTDOWN_GRACE_S="2", OTEL_RESOURCE_ATTRIBUTES="service.instance.id=a", **otel,
        )  # fmt: skip
        with a, httpx.Client(base_url=a.url, timeout=10) as c:
            order_id = _order(c, "cust-replicas", _product(c))
            request = await wait_for(lambda: _server_span(receiver, "/v1/orders"))
        assert not [s for s in receiver.trace(request["trace_id"]) if s["name"] == "smtp send" and s["instance"] == "b"]
        b = ServerProcess(
            base_env, tmp_path, "b", ORDERS_DATABASE_URL=isolated_db, ORDERS_RELAY_INTERVAL_S="0.2",
            OTEL_RESOURCE_ATTRIBUTES="service.instance.id=b", **otel,
        )  # fmt: skip
        with b:

            def sent_by_b() -> list[dict[str, Any]]:
                spans = receiver.trace(request["trace_id"])
                return [s for s in spans if s["name"] == "smtp send" and s["instance"] == "b"]

            # The row backs off after A's failed attempts (1 s, 2 s, ...): B sends it then.
            [delivery] = await wait_for(sent_by_b, timeout=30)
    assert delivery["parent"] == request["span_id"] and request["instance"] == "a"
    assert delivery["attributes"]["orders.order.id"] == order_id


@pytest.mark.slow
async def test_traces_go_over_grpc_when_the_protocol_says_so(base_env: dict[str, str], tmp_path) -> None:
    trace_id, parent = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    with OtlpGrpcReceiver() as receiver:
        server = ServerProcess(
            base_env, tmp_path,
            OTEL_EXPORTER_OTLP_ENDPOINT=receiver.url,
            OTEL_EXPORTER_OTLP_PROTOCOL="grpc",
            OTEL_BSP_SCHEDULE_DELAY="100",
        )  # fmt: skip
        with server, httpx.Client(base_url=server.url, timeout=10) as c:
            r = c.get("/v1/products", headers={"traceparent": f"00-{trace_id}-{parent}-01"})
            assert r.status_code == 200, r.text
            spans = await wait_for(lambda: receiver.trace(trace_id))
    [request] = [s for s in spans if s["parent"] == parent]
    assert request["kind"] == SERVER and request["service"] == "orders"


async def test_no_instrumentation_without_otel_variables(client: httpx.AsyncClient, db: asyncpg.Pool) -> None:
    """The test session's app (no OTEL_* variables): no middleware, no wrapped driver, no
    log processor, and outbox rows without a trace context."""
    assert not tracing.wanted() and not tracing.enabled()
    assert not getattr(client.app, "_is_instrumented_by_opentelemetry", False)  # type: ignore[attr-defined]
    assert not hasattr(asyncpg.Connection.execute, "__wrapped__")
    assert not hasattr(asyncpg.Connection.fetchrow, "__wrapped__")
    assert tracing.add_trace_ids not in structlog.get_config()["processors"]
    sku = await make_product(client, stock=5)
    r = await place(client, "cust-untraced", (sku, 1))
    assert r.status_code == 201, r.text
    rows = await db.fetch("SELECT trace_context FROM outbox WHERE order_id = $1", uuid.UUID(r.json()["id"]))
    assert [row["trace_context"] for row in rows] == [None, None]
    # ... while the standard variables do switch it on (not applied here: once per process).
    for env, on in [
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, True),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, True),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, False),
        ({"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, False),
        ({"OTEL_SERVICE_NAME": "orders"}, False),
    ]:
        assert tracing.wanted(env) is on, env
