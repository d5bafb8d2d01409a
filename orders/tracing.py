"""OpenTelemetry tracing, off unless the standard OTEL_* variables ask for it.

Off (the default), nothing is set up: no provider, no middleware, no wrapped driver, no
log processor, and every helper here returns after one test of a module global.
On (`OTEL_EXPORTER_OTLP_ENDPOINT` / `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, or
`OTEL_TRACES_EXPORTER=otlp`), the SDK reads its own variables: the resource
(`OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`), the sampler (`OTEL_TRACES_SAMPLER[_ARG]`),
the batch processor (`OTEL_BSP_*`), the exporter (`OTEL_EXPORTER_OTLP_*`) and the
propagators (`OTEL_PROPAGATORS`, W3C trace context and baggage by default). The protocol is
http/protobuf unless `OTEL_EXPORTER_OTLP[_TRACES]_PROTOCOL` says grpc.

Spans: each request (FastAPI, continuing an incoming `traceparent`), each PostgreSQL
statement (asyncpg), each Redis command, and each outbox delivery (an SMTP send, an audit
entry) as a child of the request that wrote the row: its trace context is stored with the
row, so that holds whichever replica delivers it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fastapi import FastAPI
    from opentelemetry.sdk.trace import TracerProvider

# Health probes and scrapes every few seconds would drown the traces that matter.
DEFAULT_EXCLUDED_URLS = "/healthz$,/readyz$,/metrics$"
FLUSH_TIMEOUT_MS = 5000

_provider: TracerProvider | None = None
_OFF = nullcontext()  # what the context managers below are while tracing is off


def wanted(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether the OTEL_* variables switch tracing on."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = _exporter_names(environ)
    if exporters:
        return exporters != ["none"]
    return bool(environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def enabled() -> bool:
    return _provider is not None


def _exporter_names(environ: Mapping[str, str]) -> list[str]:
    return [n.strip().lower() for n in environ.get("OTEL_TRACES_EXPORTER", "").split(",") if n.strip()]


def _exporters(environ: Mapping[str, str]) -> list[Any]:
    """The span exporters OTEL_TRACES_EXPORTER names (otlp when unset); each reads its own
    OTEL_EXPORTER_OTLP_* variables (endpoint, headers, timeout, compression)."""
    exporters: list[Any] = []
    for name in _exporter_names(environ) or ["otlp"]:
        if name == "otlp":
            protocol = (
                environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
                or "http/protobuf"
            ).strip()
            if protocol == "grpc":
                from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
            elif protocol == "http/protobuf":
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter  # type: ignore[assignment]
            else:
                raise ValueError(f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r}: grpc or http/protobuf")
            exporters.append(OTLPSpanExporter())
        elif name == "console":
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter

            exporters.append(ConsoleSpanExporter())
        else:
            raise ValueError(f"OTEL_TRACES_EXPORTER={name!r}: otlp, console or none")
    return exporters


def _start(environ: Mapping[str, str]) -> TracerProvider:
    from opentelemetry import trace
    from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor
    from opentelemetry.instrumentation.redis import RedisInstrumentor
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: "orders"}))
    provider = TracerProvider(resource=resource)  # the sampler from OTEL_TRACES_SAMPLER
    for exporter in _exporters(environ):
        provider.add_span_processor(BatchSpanProcessor(exporter))  # OTEL_BSP_*
    trace.set_tracer_provider(provider)
    AsyncPGInstrumentor().instrument()
    RedisInstrumentor().instrument()
    return provider


def instrument(app: FastAPI, environ: Mapping[str, str] = os.environ) -> None:
    """Tracing for this app when the OTEL_* variables ask for it; the provider and the
    driver instrumentation once per process."""
    global _provider
    if not wanted(environ):
        return
    if _provider is None:
        _provider = _start(environ)
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

    FastAPIInstrumentor.instrument_app(
        app,
        tracer_provider=_provider,
        excluded_urls=environ.get("OTEL_PYTHON_FASTAPI_EXCLUDED_URLS", DEFAULT_EXCLUDED_URLS),
        # One span per request, not one more per ASGI message of its body.
        exclude_spans=["receive", "send"],
    )


def flush() -> None:
    """Export what is still buffered (at shutdown: uvicorn re-raises SIGTERM, and a
    process ended by a signal runs no atexit hook)."""
    if _provider is not None:
        _provider.force_flush(FLUSH_TIMEOUT_MS)


def add_trace_ids(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    """structlog processor: the current span's ids on each line written inside one."""
    from opentelemetry import trace

    ctx = trace.get_current_span().get_span_context()
    if ctx.is_valid:
        event["trace_id"] = format(ctx.trace_id, "032x")
        event["span_id"] = format(ctx.span_id, "016x")
    return event


def log_processors(environ: Mapping[str, str] = os.environ) -> list[Any]:
    return [add_trace_ids] if wanted(environ) else []


def carrier() -> dict[str, str] | None:
    """The current trace context as W3C headers (`traceparent`, `tracestate`), to store
    with the outbox rows a request writes; None when tracing is off or there is no span."""
    if _provider is None:
        return None
    from opentelemetry import propagate

    headers: dict[str, str] = {}
    propagate.inject(headers)
    return headers or None


def delivery_span(name: str, stored: Mapping[str, str] | None, attributes: dict[str, Any]) -> Any:
    """A span for one outbox row's delivery, a child of the request that wrote the row
    (its stored context), or a root span for a row written without one."""
    if _provider is None:
        return _OFF
    return _delivery_span(name, stored, attributes)


@contextmanager
def _delivery_span(name: str, stored: Mapping[str, str] | None, attributes: dict[str, Any]) -> Iterator[None]:
    from opentelemetry import propagate, trace

    parent = propagate.extract(stored) if stored else None
    tracer = trace.get_tracer("orders.notify", tracer_provider=_provider)
    with tracer.start_as_current_span(name, context=parent, kind=trace.SpanKind.CLIENT, attributes=attributes):
        yield


def untraced() -> Any:
    """No spans for the statements and commands run inside (the relay's polls and
    bookkeeping, which serve many orders at once, would each start a trace of their own).
    Tasks created inside inherit it."""
    if _provider is None:
        return _OFF
    from opentelemetry.instrumentation.utils import suppress_instrumentation

    return suppress_instrumentation()
