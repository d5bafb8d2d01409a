-- The orders schema. Money is bigint minor units; stock never goes below zero (CHECK).

CREATE TABLE products (
    sku         text PRIMARY KEY CHECK (sku ~ '^[A-Za-z0-9._-]{1,64}$'),
    name        text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    unit_price  bigint NOT NULL CHECK (unit_price >= 0),
    currency    char(3) NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    stock       integer NOT NULL CHECK (stock >= 0),
    version     bigint NOT NULL DEFAULT 1,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE orders (
    id               uuid PRIMARY KEY,
    customer_id      text NOT NULL,
    status           text NOT NULL CHECK (status IN ('pending', 'paid', 'shipped', 'delivered', 'cancelled')),
    currency         char(3) NOT NULL,
    email            text NOT NULL,
    subtotal         bigint NOT NULL CHECK (subtotal >= 0),
    total            bigint NOT NULL CHECK (total >= 0),
    shipping_address jsonb NOT NULL,
    version          integer NOT NULL DEFAULT 1,
    created_at       timestamptz NOT NULL,
    updated_at       timestamptz NOT NULL
);
-- Keyset pagination, newest first: (created_at, id) descending, per customer and overall.
CREATE INDEX orders_customer_created_idx ON orders (customer_id, created_at DESC, id DESC);
CREATE INDEX orders_created_idx ON orders (created_at DESC, id DESC);
CREATE INDEX orders_status_created_idx ON orders (status, created_at DESC, id DESC);

CREATE TABLE order_items (
    order_id    uuid NOT NULL REFERENCES orders (id) ON DELETE CASCADE,
    position    smallint NOT NULL,
    sku         text NOT NULL REFERENCES products (sku),
    name        text NOT NULL,
    quantity    integer NOT NULL CHECK (quantity BETWEEN 1 AND 1000),
    unit_price  bigint NOT NULL CHECK (unit_price >= 0),
    line_total  bigint NOT NULL CHECK (line_total >= 0),
    PRIMARY KEY (order_id, position),
    UNIQUE (order_id, sku)
);

-- The order's timeline, written in the transactions that change it.
CREATE TABLE order_events (
    id        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    order_id  uuid NOT NULL REFERENCES orders (id) ON DELETE CASCADE,
    type      text NOT NULL,
    actor     text NOT NULL,
    data      jsonb NOT NULL DEFAULT '{}',
    at        timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX order_events_order_idx ON order_events (order_id, id);

-- Idempotency records, scoped to the customer, holding the first answer to replay.
CREATE TABLE idempotency_keys (
    customer_id   text NOT NULL,
    key           text NOT NULL,
    request_hash  bytea NOT NULL,
    status_code   smallint NOT NULL,
    response_body bytea NOT NULL,
    order_id      uuid,
    created_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (customer_id, key)
);
CREATE INDEX idempotency_keys_created_idx ON idempotency_keys (created_at);

-- Transactional outbox: notifications (email) and audit entries to deliver after commit.
-- A row is delivered by whoever claims it (claimed_until in the future is a lease):
-- the request's BackgroundTask first, the relay for what is left.
CREATE TABLE outbox (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    order_id         uuid NOT NULL REFERENCES orders (id) ON DELETE CASCADE,
    kind             text NOT NULL CHECK (kind IN ('email', 'audit')),
    topic            text NOT NULL,
    payload          jsonb NOT NULL,
    status           text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'sent', 'failed')),
    attempts         integer NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz NOT NULL,
    claimed_until    timestamptz,
    last_error       text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    sent_at          timestamptz
);
CREATE INDEX outbox_pending_idx ON outbox (next_attempt_at) WHERE status = 'pending';
CREATE INDEX outbox_sent_idx ON outbox (sent_at) WHERE status = 'sent';

-- Append-only compliance record of who did what, before and after.
CREATE TABLE audit_log (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    outbox_id   bigint NOT NULL UNIQUE,
    order_id    uuid NOT NULL,
    actor       text NOT NULL,
    action      text NOT NULL,
    before      jsonb,
    after       jsonb,
    request_id  text,
    at          timestamptz NOT NULL
);
CREATE INDEX audit_log_order_idx ON audit_log (order_id, id);

CREATE FUNCTION audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_log is append-only';
END $$;
CREATE TRIGGER audit_log_no_change BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_append_only();

-- Cache invalidations not yet applied to Redis (written in the changing transaction,
-- deleted once Redis holds the new version): replayed after a Redis outage.
CREATE TABLE cache_invalidations (
    key         text PRIMARY KEY,
    version     bigint NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
