"""PostgreSQL access: the pool, migrations and the queries of each table group.

Query helpers take a connection and never begin or commit a transaction:
the service layer owns the transaction boundary.
"""
