"""Outbox rows: claimed under a lease, then marked sent (with their side effect) or retried.

A claim sets `claimed_until`; nobody else claims the row until the lease ends. So the
request's BackgroundTask and the relay of any replica never deliver one row twice
(while a delivery finishes within the lease, which is far longer than the SMTP timeout).
"""

from __future__ import annotations

from uuid import UUID

import asyncpg

ROW = "id, order_id, kind, topic, payload, attempts, trace_context"

# A new row is due this long after its commit: until then the relay leaves it to the
# request that wrote it (its BackgroundTask dispatches it at once).
FAST_PATH_HEAD_START_S = 5.0

# Order events (kind 'event') are claimed only by a relay that publishes them ($EVENTS),
# and only while no older event row of the same order is pending (outbox_event_pending_idx):
# the events of an order reach the stream in version order, whichever path claims first
# (the fast path of a later change may try its row while the previous one is still out).
EVENT_GUARD = """
   AND (kind <> 'event' OR ($EVENTS AND NOT EXISTS (
        SELECT 1 FROM outbox older
         WHERE older.kind = 'event' AND older.status = 'pending'
           AND older.order_id = outbox.order_id AND older.id < outbox.id)))
"""

CLAIM_IDS_SQL = f"""
UPDATE outbox SET claimed_until = now() + make_interval(secs => $2), attempts = attempts + 1
 WHERE id = ANY($1::bigint[]) AND status = 'pending'
   AND (claimed_until IS NULL OR claimed_until < now())
   {EVENT_GUARD.replace("$EVENTS", "$3::bool")}
RETURNING {ROW}
"""

# The next event row of each of these orders, once the previous one is published: due or
# not (its fast path may have found the previous one still pending and left it).
CLAIM_NEXT_EVENTS_SQL = f"""
UPDATE outbox SET claimed_until = now() + make_interval(secs => $2), attempts = attempts + 1
 WHERE id = ANY(ARRAY(
        SELECT min(id) FROM outbox
         WHERE kind = 'event' AND status = 'pending' AND order_id = ANY($1::uuid[])
         GROUP BY order_id))
   AND status = 'pending' AND (claimed_until IS NULL OR claimed_until < now())
RETURNING {ROW}
"""

CLAIM_DUE_SQL = f"""
WITH due AS (
    SELECT id FROM outbox
     WHERE status = 'pending' AND next_attempt_at <= now() + make_interval(secs => $3)
       AND (claimed_until IS NULL OR claimed_until < now())
       {EVENT_GUARD.replace("$EVENTS", "$4::bool")}
     ORDER BY next_attempt_at
     LIMIT $1
       FOR UPDATE SKIP LOCKED
), claimed AS (
    UPDATE outbox o SET claimed_until = now() + make_interval(secs => $2), attempts = o.attempts + 1
      FROM due WHERE o.id = due.id
    RETURNING o.{ROW.replace(", ", ", o.")}
)
SELECT * FROM claimed ORDER BY id
"""

# Batched: $1 is every row of a delivery batch that went through. The email and audit
# statements add their side effect to it.
MARK_SENT = """
UPDATE outbox SET status = 'sent', sent_at = now(), claimed_until = NULL, last_error = NULL
 WHERE id = ANY($1::bigint[]) AND status = 'pending'
"""

EMAIL_SENT_SQL = f"""
WITH done AS ({MARK_SENT} RETURNING order_id, topic, payload)
INSERT INTO order_events (order_id, type, actor, data)
SELECT order_id, 'notification.sent', 'system',
       jsonb_build_object('channel', 'email', 'topic', topic, 'message_id', payload->>'message_id')
  FROM done
"""

AUDIT_SENT_SQL = f"""
WITH done AS ({MARK_SENT} RETURNING id, order_id, payload, created_at)
INSERT INTO audit_log (outbox_id, order_id, actor, action, before, after, request_id, at)
SELECT id, order_id, payload->>'actor', payload->>'action', payload->'before', payload->'after',
       payload->>'request_id', created_at
  FROM done
ON CONFLICT (outbox_id) DO NOTHING
"""

# Published order events: nothing else to record (the stream holds them).
EVENT_SENT_SQL = MARK_SENT

# Batched: one row of ($1 id, $2 error, $3 delay, $4 give up) per failed row.
RETRY_SQL = """
UPDATE outbox o
   SET claimed_until = NULL, last_error = left(r.error, 500),
       next_attempt_at = now() + make_interval(secs => r.delay),
       status = CASE WHEN r.give_up THEN 'failed' ELSE 'pending' END
  FROM unnest($1::bigint[], $2::text[], $3::float8[], $4::bool[]) AS r(id, error, delay, give_up)
 WHERE o.id = r.id AND o.status = 'pending'
"""


async def claim_ids(
    conn: asyncpg.Connection, ids: list[int], lease_s: float, events: bool = False
) -> list[asyncpg.Record]:
    """These rows, unless claimed meanwhile; `events`: this relay publishes order events."""
    return await conn.fetch(CLAIM_IDS_SQL, ids, lease_s, events)


async def claim_due(
    conn: asyncpg.Connection, limit: int, lease_s: float, ahead_s: float = 0.0, events: bool = False
) -> list[asyncpg.Record]:
    """Due rows (or due within `ahead_s`, for the flush at shutdown), oldest first, and
    delivered in the order they were written."""
    return await conn.fetch(CLAIM_DUE_SQL, limit, lease_s, ahead_s, events)


async def claim_next_events(conn: asyncpg.Connection, order_ids: list[UUID], lease_s: float) -> list[asyncpg.Record]:
    """The oldest pending event row of each order (the next to publish), unless leased."""
    return await conn.fetch(CLAIM_NEXT_EVENTS_SQL, order_ids, lease_s)


SENT_SQL = {"email": EMAIL_SENT_SQL, "audit": AUDIT_SENT_SQL, "event": EVENT_SENT_SQL}


async def mark_sent(conn: asyncpg.Connection, row_ids: list[int], kind: str) -> None:
    """Rows delivered: `sent`, plus their side effect (a timeline event, an audit entry)."""
    await conn.execute(SENT_SQL[kind], row_ids)


async def mark_retry(
    conn: asyncpg.Connection, row_ids: list[int], errors: list[str], delays_s: list[float], give_up: list[bool]
) -> None:
    """Rows that failed, each with its error: pending again after their delay, or `failed`."""
    await conn.execute(RETRY_SQL, row_ids, errors, delays_s, give_up)


async def stats(conn: asyncpg.Connection) -> asyncpg.Record:
    """Pending rows, the lag of the oldest due one and the age of the oldest one (through
    outbox_pending_idx), the same for order events (unpublished), and the `failed` rows by
    kind (through outbox_failed_idx)."""
    row = await conn.fetchrow(
        """
        SELECT count(*) AS pending,
               coalesce(extract(epoch FROM now() - min(next_attempt_at)
                        FILTER (WHERE next_attempt_at <= now())), 0)::float8 AS lag_s,
               coalesce(extract(epoch FROM now() - min(created_at)), 0)::float8 AS oldest_s,
               count(*) FILTER (WHERE kind = 'event') AS events,
               coalesce(extract(epoch FROM now() - min(created_at) FILTER (WHERE kind = 'event')), 0)::float8
                   AS events_oldest_s,
               (SELECT coalesce(jsonb_object_agg(kind, n), '{}')
                  FROM (SELECT kind, count(*) AS n FROM outbox WHERE status = 'failed' GROUP BY kind) f) AS failed
          FROM outbox WHERE status = 'pending'
        """
    )
    assert row is not None
    return row


# Operators' view (`orders outbox`, /v1/admin/notifications): newest first, by id.
VIEW = "id, order_id, kind, topic, status, attempts, last_error, created_at, next_attempt_at, sent_at"


async def page(
    conn: asyncpg.Connection, *, status: str | None, order_id: UUID | None, before_id: int | None, limit: int
) -> list[asyncpg.Record]:
    """Rows newest first, those before `before_id` (the previous page's last), filtered."""
    return await conn.fetch(
        f"""
        SELECT {VIEW} FROM outbox
         WHERE ($1::text IS NULL OR status = $1) AND ($2::uuid IS NULL OR order_id = $2)
           AND ($3::bigint IS NULL OR id < $3)
         ORDER BY id DESC LIMIT $4
        """,
        status,
        order_id,
        before_id,
        limit,
    )


async def get(conn: asyncpg.Connection, row_id: int) -> asyncpg.Record | None:
    return await conn.fetchrow(f"SELECT {VIEW} FROM outbox WHERE id = $1", row_id)


async def retry(conn: asyncpg.Connection, row_ids: list[int] | None) -> list[asyncpg.Record]:
    """`failed` rows (these, or all when `row_ids` is None) become pending and due now, with
    their attempts from 0 (a fresh backoff); one statement, so a row that is not `failed`
    (pending, sent, or re-queued meanwhile by another operator) is left as it is and is never
    sent twice. Returns the rows re-queued."""
    return await conn.fetch(
        f"""
        UPDATE outbox SET status = 'pending', attempts = 0, claimed_until = NULL, next_attempt_at = now()
         WHERE status = 'failed' AND ($1::bigint[] IS NULL OR id = ANY($1::bigint[]))
        RETURNING {VIEW}
        """,
        row_ids,
    )


async def purge_sent(conn: asyncpg.Connection, older_than_hours: int, batch: int) -> int:
    """Deletes up to `batch` rows sent before the retention, oldest first (outbox_sent_idx);
    rows another replica is deleting are skipped. Returns how many went."""
    result = await conn.execute(
        """
        DELETE FROM outbox WHERE id = ANY(ARRAY(
            SELECT id FROM outbox
             WHERE status = 'sent' AND sent_at < now() - make_interval(hours => $1)
             ORDER BY sent_at LIMIT $2 FOR UPDATE SKIP LOCKED))
        """,
        older_than_hours,
        batch,
    )
    return int(result.split()[-1])
