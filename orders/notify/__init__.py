"""Notifications that are never lost: outbox rows written in the order's transaction,
delivered after the response by a BackgroundTask, and by the relay for whatever is left."""
