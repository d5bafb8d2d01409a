-- Events of the payment provider (POST /v1/payments/events). The provider's event id is
-- the primary key: an id takes effect at most once, also when two replicas receive it at
-- once (the second INSERT .. ON CONFLICT DO NOTHING waits for the first's transaction and
-- then inserts nothing). `seq` orders the staff listing (newest first) and is its cursor.
-- No foreign key to orders: an event naming no order is recorded too (outcome `ignored`),
-- so that its id is answered `duplicate` when it comes again.

CREATE TABLE payment_events (
    id           text PRIMARY KEY,
    seq          bigint GENERATED ALWAYS AS IDENTITY UNIQUE,
    order_id     uuid NOT NULL,
    type         text NOT NULL,
    amount       bigint NOT NULL,
    currency     text NOT NULL,
    outcome      text NOT NULL,
    received_at  timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX payment_events_outcome_idx ON payment_events (outcome, seq DESC);
CREATE INDEX payment_events_order_idx ON payment_events (order_id);
