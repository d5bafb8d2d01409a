-- Operators list and count the `failed` outbox rows (orders outbox list, the metrics of
-- every replica's housekeeping): a partial index keeps that off the whole table.
CREATE INDEX IF NOT EXISTS outbox_failed_idx ON outbox (id) WHERE status = 'failed';
