"""Pure rules: no I/O, no FastAPI, asyncpg or Redis."""
