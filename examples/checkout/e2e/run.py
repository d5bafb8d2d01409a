"""`make e2e`: the checkout page in a real browser against a real service.

Starts, on free ports of 127.0.0.1: a fresh PostgreSQL database and Redis under a key prefix
of its own (on the servers the tests use: ORDERS_TEST_DATABASE_URL / ORDERS_TEST_REDIS_URL, else
the machine's on 5432 / 6379, else embedded ones), an SMTP sink writing each
message to a directory, `orders serve` with CORS for the page's origin, the test payment
provider (provider.py) with that service's webhook secret, and `vite preview` of the built page
(dist/). A second `orders serve`, on a database and prefix of its own, expires unpaid orders
after EXPIRY_TIMEOUT_S (the expiry scenario: the first one's orders must not expire meanwhile).
Seeds a catalog in both, then runs the Playwright tests (`node --test e2e/`) with Debian's
Chromium. Everything it started is stopped, and the databases dropped, whatever happens. Run
from the repo root, after `npm ci` and `npm run build` in examples/checkout/.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.request
from contextlib import ExitStack
from pathlib import Path

from orders.auth import mint
from orders.dev.postgres import fresh_database, server_dsn
from orders.dev.process import free_port, wait_for_http
from orders.dev.redis import forget_keys, server_url
from orders.dev.smtp import SmtpSink
from orders.settings import Settings

HERE = Path(__file__).resolve().parent
PAGE_DIR = HERE.parent
CHROMIUM = "/usr/bin/chromium"

CATALOG = [
    # sku, name, unit_price (minor units), currency, stock
    ("MUG-001", "Mug", 1299, "USD", 100),
    ("POSTER-A2", "Poster A2", 1800, "USD", 25),
    ("LAMP-LTD", "Limited lamp", 4999, "USD", 2),
    ("TEA-JP", "Sencha tea", 1500, "JPY", 30),
    ("DATES-KW", "Dates box", 1250, "KWD", 10),
]
# One customer per scenario, so that none sees another's orders, rate limit or pending cap.
CUSTOMERS = ["buyer", "retry", "busy", "reload", "errors", "limited", "history", "payer", "decliner", "expiry"]
RATE_LIMIT = 6
# The main service's payment timeout (its default, set so that the page is told the truth), and
# the expiry service's: short, so that the scenario waits seconds.
PAYMENT_TIMEOUT_S = 900
EXPIRY_TIMEOUT_S = 3


def ensure_chromium() -> None:
    """Debian's chromium (no browser download): installed when missing, as CI does."""
    if os.access(CHROMIUM, os.X_OK):
        return
    apt = ["apt-get", "-o", "DPkg::Lock::Timeout=600"]
    subprocess.run([*apt, "update", "-q"], check=True, timeout=600)
    subprocess.run(
        [*apt, "install", "-y", "-q", "chromium"],
        check=True,
        timeout=1200,
        env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
    )


def start(
    stack: ExitStack, cmd: list[str], env: dict[str, str], log: Path, cwd: Path | None = None
) -> subprocess.Popen[bytes]:
    out = log.open("wb")
    stack.callback(out.close)
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def stop() -> None:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)

    stack.callback(stop)
    return proc


def seed(api: str, admin_token: str) -> None:
    for sku, name, price, currency, stock in CATALOG:
        body = json.dumps({"name": name, "unit_price": price, "currency": currency, "stock": stock}).encode()
        req = urllib.request.Request(
            f"{api}/v1/products/{sku}",
            data=body,
            method="PUT",
            headers={"Authorization": f"Bearer {admin_token}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=10) as r:
            assert r.status in (200, 201), r.status


def main() -> int:
    ensure_chromium()
    if not (PAGE_DIR / "dist" / "index.html").exists():
        sys.exit("examples/checkout/dist is missing: run `npm run build` there first (make e2e does)")
    run_id = secrets.token_hex(4)
    prefix = f"orders-e2e-{run_id}:"
    api_port, expiry_port, provider_port, page_port = free_port(), free_port(), free_port(), free_port()
    api, page = f"http://127.0.0.1:{api_port}", f"http://127.0.0.1:{page_port}"
    expiry_api, provider = f"http://127.0.0.1:{expiry_port}", f"http://127.0.0.1:{provider_port}"
    secret = secrets.token_urlsafe(48)
    webhook_secret = secrets.token_urlsafe(48)
    # SIGTERM (CI's stop, a Ctrl-C's cousin) unwinds the stack like an exception.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    with ExitStack() as stack:
        work = Path(tempfile.mkdtemp(prefix="orders-e2e-"))
        stack.callback(shutil.rmtree, work, ignore_errors=True)
        admin_dsn = stack.enter_context(server_dsn(work))
        redis_url = stack.enter_context(server_url(work))
        dsn = stack.enter_context(fresh_database(admin_dsn, "orders_e2e"))
        expiry_dsn = stack.enter_context(fresh_database(admin_dsn, "orders_e2e_expiry"))
        stack.callback(forget_keys, redis_url, prefix)
        sink = SmtpSink(work)
        smtp_host, smtp_port = sink.start()
        stack.callback(sink.stop)

        env = {
            **os.environ,
            "ORDERS_DATABASE_URL": dsn,
            "ORDERS_REDIS_URL": redis_url,
            "ORDERS_CACHE_PREFIX": prefix,
            "ORDERS_SMTP_HOST": smtp_host,
            "ORDERS_SMTP_PORT": str(smtp_port),
            "ORDERS_JWT_SECRET": secret,
            "ORDERS_PAYMENT_WEBHOOK_SECRET": webhook_secret,
            "ORDERS_PAYMENT_TIMEOUT_S": str(PAYMENT_TIMEOUT_S),
            "ORDERS_CORS_ORIGINS": page,
            "ORDERS_HOST": "127.0.0.1",
            "ORDERS_PORT": str(api_port),
            "ORDERS_RATE_LIMIT_PER_MINUTE": str(RATE_LIMIT),
            "ORDERS_LOG_LEVEL": "warning",
        }
        expiry_env = {
            **env,
            "ORDERS_DATABASE_URL": expiry_dsn,
            "ORDERS_CACHE_PREFIX": f"{prefix}expiry:",
            "ORDERS_PAYMENT_TIMEOUT_S": str(EXPIRY_TIMEOUT_S),
            "ORDERS_PORT": str(expiry_port),
        }
        logs = ["server.log", "expiry-server.log", "provider.log", "vite.log"]
        server = start(stack, [sys.executable, "-m", "orders", "serve"], env, work / logs[0])
        expiry_server = start(stack, [sys.executable, "-m", "orders", "serve"], expiry_env, work / logs[1])
        provider_cmd = [sys.executable, str(PAGE_DIR / "provider.py"), "--api", api, "--port", str(provider_port)]
        provider_env = {**os.environ, "ORDERS_PAYMENT_WEBHOOK_SECRET": webhook_secret}
        payment_provider = start(stack, [*provider_cmd, "--origin", page], provider_env, work / logs[2])
        vite = PAGE_DIR / "node_modules" / ".bin" / "vite"
        preview = start(
            stack,
            [str(vite), "preview", "--host", "127.0.0.1", "--port", str(page_port), "--strictPort"],
            dict(os.environ),
            work / logs[3],
            cwd=PAGE_DIR,
        )
        try:
            wait_for_http(f"{api}/readyz", server, 60)
            wait_for_http(f"{expiry_api}/readyz", expiry_server, 60)
            wait_for_http(f"{provider}/healthz", payment_provider, 30)
            wait_for_http(page, preview, 30)
        except Exception:
            for log in logs:
                sys.stderr.write(f"--- {log}\n{(work / log).read_text(errors='replace')[-3000:]}\n")
            raise
        settings = Settings(_env_file=None, dev=True, jwt_secret=secret)  # type: ignore[call-arg]
        tokens = {who: mint(settings, f"e2e-{who}") for who in CUSTOMERS}
        tokens["admin"] = mint(settings, "e2e-admin", roles=["admin"])
        seed(api, tokens["admin"])
        seed(expiry_api, tokens["admin"])
        test_env = {
            **os.environ,
            "E2E_API": api,
            "E2E_PAGE": page,
            "E2E_PROVIDER": provider,
            "E2E_PAYMENT_TIMEOUT_S": str(PAYMENT_TIMEOUT_S),
            "E2E_EXPIRY_API": expiry_api,
            "E2E_EXPIRY_TIMEOUT_S": str(EXPIRY_TIMEOUT_S),
            "E2E_MAIL_DIR": str(work / "mail"),
            "E2E_TOKENS": json.dumps(tokens),
            "E2E_RATE_LIMIT": str(RATE_LIMIT),
            "E2E_CHROMIUM": CHROMIUM,
        }
        result = subprocess.run(
            ["node", "--test", "--test-concurrency=1", "--test-timeout=120000", "e2e/checkout.test.mjs"],
            cwd=PAGE_DIR,
            env=test_env,
            timeout=900,
        )
        if result.returncode != 0:
            for log in logs[:3]:
                sys.stderr.write(f"--- {log} (tail)\n{(work / log).read_text(errors='replace')[-4000:]}\n")
        return result.returncode


if __name__ == "__main__":
    sys.exit(main())
