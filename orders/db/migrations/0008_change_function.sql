-- A status change in one call (orders.db.orders.CHANGE_SQL calls it): in autocommit for
-- the staff's and the customer's changes (no BEGIN, no SELECT ... FOR UPDATE, no COMMIT:
-- one round trip instead of four), and inside the transaction of the payment webhook and
-- of the expiry, which hold the row already. The service builds the change from the order
-- as it last saw it (the cache, or a read) at p_version, and judges 404/412/409 on it;
-- this function applies the change only if the order is still at p_version, so a change
-- judged on a version that is no longer the latest is never written.
--
-- Outcomes:
--   changed    version/updated_at: the order's new ones; outbox_ids: the rows written;
--              released: [[sku, version], ...] of the products a cancellation restocked;
--   stale      the order is not at p_version (a stale cache, or a change that committed
--              first): nothing was written, the order columns and items are the latest
--              committed row, for the caller to judge and build the change again;
--   not_found  no such order.
-- Locks, as every writer takes them: the order's row (a concurrent change of it waits,
-- then finds the version moved and answers stale: of two racing changes exactly one is
-- written), then the customer's row of customer_pending (the triggers of migration 0002,
-- when the order leaves pending), then the restocked product rows in SKU order, the order
-- orders_place() takes the customer's and the products' rows in.
-- The order event's `time` and `data.updated_at` are the statement's now(), which is also
-- the order's updated_at: known only here, so they are set here on the rows of kind 'event'.
CREATE FUNCTION orders_change(
    p_order_id uuid, p_version integer, p_status text,
    p_event_type text, p_actor text, p_event_data jsonb, p_release_stock boolean,
    p_outbox_delay_s float8, p_outbox_kinds text[], p_outbox_topics text[], p_outbox_payloads jsonb[],
    p_trace_context jsonb,
    OUT outcome text,
    OUT id uuid, OUT customer_id text, OUT status text, OUT currency text, OUT email text,
    OUT subtotal bigint, OUT total bigint, OUT shipping_address jsonb, OUT version integer,
    OUT created_at timestamptz, OUT updated_at timestamptz, OUT items jsonb,
    OUT outbox_ids bigint[], OUT released jsonb
) LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_at jsonb;
BEGIN
    UPDATE orders o SET status = p_status, version = o.version + 1, updated_at = now()
     WHERE o.id = p_order_id AND o.version = p_version
    RETURNING o.version, o.updated_at INTO version, updated_at;
    IF NOT FOUND THEN
        -- A new snapshot (this statement's): the latest committed row, the winner's
        -- change included when this call waited for it.
        SELECT o.id, o.customer_id, o.status, o.currency::text, o.email, o.subtotal, o.total,
               o.shipping_address, o.version, o.created_at, o.updated_at,
               (SELECT jsonb_agg(jsonb_build_object(
                           'sku', i.sku, 'name', i.name, 'quantity', i.quantity,
                           'unit_price', i.unit_price, 'line_total', i.line_total) ORDER BY i.position)
                  FROM order_items i WHERE i.order_id = o.id)
          INTO id, customer_id, status, currency, email, subtotal, total,
               shipping_address, version, created_at, updated_at, items
          FROM orders o WHERE o.id = p_order_id;
        outcome := CASE WHEN FOUND THEN 'stale' ELSE 'not_found' END;
        RETURN;
    END IF;

    IF p_release_stock THEN
        -- MATERIALIZED: no plan locks the product rows in another order.
        WITH locked AS MATERIALIZED (
            SELECT p.sku FROM products p
             WHERE p.sku IN (SELECT i.sku FROM order_items i WHERE i.order_id = p_order_id)
             ORDER BY p.sku FOR NO KEY UPDATE OF p
        ), restocked AS (
            UPDATE products p
               SET stock = p.stock + i.quantity, version = p.version + 1, updated_at = now()
              FROM order_items i JOIN locked USING (sku)
             WHERE i.order_id = p_order_id AND p.sku = i.sku
         RETURNING p.sku, p.version
        )
        SELECT jsonb_agg(jsonb_build_array(r.sku, r.version) ORDER BY r.sku) INTO released FROM restocked r;
    END IF;

    INSERT INTO order_events (order_id, type, actor, data)
    VALUES (p_order_id, p_event_type, p_actor, p_event_data);

    v_at := to_jsonb(to_char(updated_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'));
    WITH rows AS (
        INSERT INTO outbox (order_id, kind, topic, payload, next_attempt_at, trace_context)
        SELECT p_order_id, t.kind, t.topic,
               CASE WHEN t.kind = 'event'
                    THEN jsonb_set(jsonb_set(t.payload, '{time}', v_at), '{data,updated_at}', v_at)
                    ELSE t.payload END,
               now() + make_interval(secs => p_outbox_delay_s), p_trace_context
          FROM unnest(p_outbox_kinds, p_outbox_topics, p_outbox_payloads) AS t(kind, topic, payload)
        RETURNING id
    )
    SELECT array_agg(rows.id ORDER BY rows.id) INTO outbox_ids FROM rows;
    outcome := 'changed';
END $$;
