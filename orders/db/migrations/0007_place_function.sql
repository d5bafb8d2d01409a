-- A new order in one call, in autocommit (orders.db.orders.PLACE_SQL calls it): no BEGIN,
-- no COMMIT, no claim statement before it. One round trip instead of four. The service
-- prices the order in Python from its snapshot of the catalog (orders/service/price_list.py);
-- this function judges everything on the rows it locks, and writes only when the order is
-- placed, so a refused order stores nothing under its key and reserves nothing.
--
-- Outcomes, in docs/API.md's order of precedence:
--   stored            the key has a committed record (request_hash, status_code,
--                     response_body): the caller replays it or answers key reuse;
--   in_progress       another request holds the key's lock;
--   too_many_pending  the customer is at p_max_pending (0: no cap);
--   catalog_changed   a line's name, price or currency is not the snapshot's (or the
--                     snapshot did not know a product that exists now, or the reverse):
--                     skus/names/unit_prices/currencies carry the locked rows' terms, the
--                     caller prices again from them (nothing was written);
--   insufficient_stock / unknown_sku: skus says which;
--   placed            skus/versions: the reserved products at their new versions,
--                     outbox_ids: the outbox rows written.
-- Locks, as every writer takes them (orders.CHANGE_SQL too): the key's advisory lock
-- (transaction scoped, tried, never waited for), the customer's row of customer_pending,
-- then the product rows in SKU order. A deadlock aborts the whole call, which wrote
-- nothing then: the caller calls again (an EXCEPTION block here would cost a
-- subtransaction on every order, for a case the lock order already rules out).
-- p_term_names NULL for a line: the snapshot does not know that SKU.
CREATE FUNCTION orders_place(
    p_order_id uuid, p_customer_id text, p_currency text, p_email text,
    p_subtotal bigint, p_total bigint, p_shipping_address jsonb, p_created_at timestamptz,
    p_item_positions smallint[], p_item_skus text[], p_item_names text[], p_item_quantities integer[],
    p_item_unit_prices bigint[], p_item_line_totals bigint[],
    p_event_data jsonb, p_outbox_delay_s float8,
    p_outbox_kinds text[], p_outbox_topics text[], p_outbox_payloads jsonb[],
    p_idempotency_key text, p_request_hash bytea, p_response_body bytea,
    p_term_skus text[], p_term_quantities integer[], p_term_names text[], p_term_unit_prices bigint[],
    p_max_pending integer, p_trace_context jsonb,
    OUT outcome text,
    OUT request_hash bytea, OUT status_code smallint, OUT response_body bytea,
    OUT skus text[], OUT versions bigint[],
    OUT names text[], OUT unit_prices bigint[], OUT currencies text[],
    OUT outbox_ids bigint[]
) LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_locked boolean;
    v_pending integer;
    v_changed boolean;
    v_short text[];
    v_unknown text[];
BEGIN
    -- The key: a committed record wins over the lock (replay, then reuse, then in progress).
    -- Read after the lock is taken, so a record committed before it is seen.
    v_locked := pg_try_advisory_xact_lock(hashtext(p_customer_id), hashtext(p_idempotency_key));
    SELECT k.request_hash, k.status_code, k.response_body
      INTO request_hash, status_code, response_body
      FROM idempotency_keys k WHERE k.customer_id = p_customer_id AND k.key = p_idempotency_key;
    IF FOUND THEN
        outcome := 'stored';
        RETURN;
    END IF;
    IF NOT v_locked THEN
        outcome := 'in_progress';
        RETURN;
    END IF;

    -- The customer's row first: one customer's orders are placed one at a time, and the
    -- count (kept by the triggers of migration 0002) is read on its latest version.
    SELECT c.pending INTO v_pending FROM customer_pending c WHERE c.customer_id = p_customer_id FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        INSERT INTO customer_pending AS c (customer_id, pending) VALUES (p_customer_id, 0)
            ON CONFLICT (customer_id) DO UPDATE SET pending = c.pending
        RETURNING c.pending INTO v_pending;
    END IF;
    IF p_max_pending > 0 AND v_pending >= p_max_pending THEN
        outcome := 'too_many_pending';
        RETURN;
    END IF;

    -- The product rows in SKU order (MATERIALIZED: no plan locks them in another order),
    -- judged on their latest versions.
    WITH req AS (
        SELECT * FROM unnest(p_term_skus, p_term_quantities, p_term_names, p_term_unit_prices)
                   AS r(sku, qty, name, unit_price)
    ), locked AS MATERIALIZED (
        SELECT p.sku, p.stock, p.name, p.unit_price, p.currency::text AS currency
          FROM products p WHERE p.sku = ANY(p_term_skus)
         ORDER BY p.sku FOR NO KEY UPDATE OF p
    )
    SELECT coalesce(bool_or((l.sku IS NULL) <> (req.name IS NULL)
                            OR l.name <> req.name OR l.unit_price <> req.unit_price
                            OR l.currency <> p_currency), false),
           array_agg(req.sku ORDER BY req.sku) FILTER (WHERE l.stock < req.qty),
           array_agg(req.sku ORDER BY req.sku) FILTER (WHERE l.sku IS NULL),
           array_agg(l.sku ORDER BY l.sku) FILTER (WHERE l.sku IS NOT NULL),
           array_agg(l.name ORDER BY l.sku) FILTER (WHERE l.sku IS NOT NULL),
           array_agg(l.unit_price ORDER BY l.sku) FILTER (WHERE l.sku IS NOT NULL),
           array_agg(l.currency ORDER BY l.sku) FILTER (WHERE l.sku IS NOT NULL)
      INTO v_changed, v_short, v_unknown, skus, names, unit_prices, currencies
      FROM req LEFT JOIN locked l ON l.sku = req.sku;
    IF v_changed THEN
        outcome := 'catalog_changed';
        RETURN;
    END IF;
    names := NULL;
    unit_prices := NULL;
    currencies := NULL;
    IF v_short IS NOT NULL THEN
        outcome := 'insufficient_stock';
        skus := v_short;
        RETURN;
    END IF;
    IF v_unknown IS NOT NULL THEN
        outcome := 'unknown_sku';
        skus := v_unknown;
        RETURN;
    END IF;

    -- Placed: every line is in stock at the snapshot's terms, on rows this call holds.
    WITH upd AS (
        UPDATE products p
           SET stock = p.stock - r.qty, version = p.version + 1, updated_at = now()
          FROM unnest(p_term_skus, p_term_quantities) AS r(sku, qty)
         WHERE p.sku = r.sku
     RETURNING p.sku, p.version
    )
    SELECT array_agg(upd.sku ORDER BY upd.sku), array_agg(upd.version ORDER BY upd.sku)
      INTO skus, versions FROM upd;
    INSERT INTO orders (id, customer_id, status, currency, email, subtotal, total,
                        shipping_address, version, created_at, updated_at)
    VALUES (p_order_id, p_customer_id, 'pending', p_currency, p_email, p_subtotal, p_total,
            p_shipping_address, 1, p_created_at, p_created_at);
    INSERT INTO order_items (order_id, position, sku, name, quantity, unit_price, line_total)
    SELECT p_order_id, t.* FROM unnest(p_item_positions, p_item_skus, p_item_names, p_item_quantities,
                                       p_item_unit_prices, p_item_line_totals) AS t;
    INSERT INTO order_events (order_id, type, actor, data, at)
    VALUES (p_order_id, 'order.created', p_customer_id, p_event_data, p_created_at);
    WITH rows AS (
        INSERT INTO outbox (order_id, kind, topic, payload, next_attempt_at, trace_context)
        SELECT p_order_id, t.kind, t.topic, t.payload, now() + make_interval(secs => p_outbox_delay_s),
               p_trace_context
          FROM unnest(p_outbox_kinds, p_outbox_topics, p_outbox_payloads) AS t(kind, topic, payload)
        RETURNING id
    )
    SELECT array_agg(rows.id ORDER BY rows.id) INTO outbox_ids FROM rows;
    INSERT INTO idempotency_keys (customer_id, key, request_hash, status_code, response_body, order_id)
    VALUES (p_customer_id, p_idempotency_key, p_request_hash, 201, p_response_body, p_order_id);
    outcome := 'placed';
END $$;
