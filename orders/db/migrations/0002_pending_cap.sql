-- Pending orders per customer, for ORDERS_MAX_PENDING_ORDERS_PER_CUSTOMER. The count is
-- kept by triggers on orders, so every writer keeps it exact: placing, paying, cancelling,
-- any later transition out of pending, a delete, and replicas of the previous release
-- still serving during a rolling update. orders.PLACE_SQL locks the customer's row before
-- anything else and places the order only while the count is under the cap.

CREATE TABLE customer_pending (
    customer_id  text PRIMARY KEY,
    pending      integer NOT NULL CHECK (pending >= 0)
);

CREATE FUNCTION customer_pending_count() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP <> 'INSERT' AND OLD.status = 'pending' THEN
        UPDATE customer_pending SET pending = pending - 1 WHERE customer_id = OLD.customer_id;
    END IF;
    IF TG_OP <> 'DELETE' AND NEW.status = 'pending' THEN
        INSERT INTO customer_pending AS c (customer_id, pending) VALUES (NEW.customer_id, 1)
            ON CONFLICT (customer_id) DO UPDATE SET pending = c.pending + 1;
    END IF;
    RETURN NULL;
END $$;

-- Taken before the backfill: writers of orders wait for this migration to commit, so no
-- order is missed between the count and the triggers.
LOCK TABLE orders IN SHARE ROW EXCLUSIVE MODE;

CREATE TRIGGER orders_pending_insert AFTER INSERT ON orders
    FOR EACH ROW WHEN (NEW.status = 'pending') EXECUTE FUNCTION customer_pending_count();
CREATE TRIGGER orders_pending_update AFTER UPDATE OF status, customer_id ON orders
    FOR EACH ROW WHEN ((OLD.status = 'pending' OR NEW.status = 'pending')
                       AND (OLD.status, OLD.customer_id) IS DISTINCT FROM (NEW.status, NEW.customer_id))
    EXECUTE FUNCTION customer_pending_count();
CREATE TRIGGER orders_pending_delete AFTER DELETE ON orders
    FOR EACH ROW WHEN (OLD.status = 'pending') EXECUTE FUNCTION customer_pending_count();

INSERT INTO customer_pending (customer_id, pending)
SELECT customer_id, count(*) FROM orders WHERE status = 'pending' GROUP BY customer_id;
