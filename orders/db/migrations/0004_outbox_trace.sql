-- The trace context (W3C `traceparent`, `tracestate`) of the request that wrote an outbox
-- row, so that its delivery, by any replica, is a span of that request's trace
-- (orders/tracing.py). NULL while tracing is off. A nullable column without a default:
-- a catalog change, no table rewrite; replicas of the previous release ignore it.

ALTER TABLE outbox ADD COLUMN trace_context jsonb;
