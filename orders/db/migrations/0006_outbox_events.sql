-- Order events for NATS JetStream (orders/notify/events.py) go through the outbox as rows of
-- kind 'event'. Replicas of the previous release survive this: their relay claims a row of
-- a kind it does not know and delivers nothing (the lease expires, the row stays pending).
-- NOT VALID: every existing row passed the stricter old CHECK, so no scan of a large
-- outbox under the table lock; new rows are checked all the same.
ALTER TABLE outbox DROP CONSTRAINT IF EXISTS outbox_kind_check;
ALTER TABLE outbox ADD CONSTRAINT outbox_kind_check CHECK (kind IN ('email', 'audit', 'event')) NOT VALID;
-- The claim's per-order guard (orders/db/outbox.py): an event row is claimed only while no
-- older event row of its order is still pending, so an order's events reach the stream in
-- version order. This index answers that check.
CREATE INDEX IF NOT EXISTS outbox_event_pending_idx ON outbox (order_id, id)
    WHERE kind = 'event' AND status = 'pending';
