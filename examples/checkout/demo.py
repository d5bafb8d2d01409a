"""`make demo`: `orders dev` (what `make run` starts: embedded PostgreSQL, Redis, NATS and SMTP sink,
demo catalog) with CORS for the checkout page, the test payment provider (provider.py) with the
service's webhook secret, and the built page served by `vite preview` on its own origin. Prints
the page's address, which carries a demo customer token (?token=), the provider (?provider=) and
the service's payment timeout (?payment_timeout_s=). Ctrl-C stops all three. DEMO_API_PORT
(8000), DEMO_PROVIDER_PORT (8001) and DEMO_PAGE_PORT (5173) move them."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlencode

from orders.auth import mint
from orders.dev.process import wait_for_http
from orders.settings import Settings

HERE = Path(__file__).resolve().parent


def main() -> int:
    api_port = int(os.environ.get("DEMO_API_PORT", "8000"))
    page_port = int(os.environ.get("DEMO_PAGE_PORT", "5173"))
    provider_port = int(os.environ.get("DEMO_PROVIDER_PORT", "8001"))
    api, page = f"http://127.0.0.1:{api_port}", f"http://127.0.0.1:{page_port}"
    provider = f"http://127.0.0.1:{provider_port}"
    # A secret of the demo's own unless one is set, so that it can mint the page's token.
    secret = os.environ.get("ORDERS_JWT_SECRET") or secrets.token_urlsafe(48)
    origins = ",".join(filter(None, [os.environ.get("ORDERS_CORS_ORIGINS"), page]))
    env = {**os.environ, "ORDERS_JWT_SECRET": secret, "ORDERS_CORS_ORIGINS": origins}
    dev_dir = Path(os.environ.get("ORDERS_DEV_DIR", ".dev")).resolve()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        service = subprocess.Popen([sys.executable, "-m", "orders", "dev", "--port", str(api_port)], env=env)
        procs.append(service)
        try:
            wait_for_http(f"{api}/readyz", service, 120)
        except (RuntimeError, TimeoutError) as exc:
            sys.exit(str(exc))
        # The secret orders dev took: the environment's, else the one it keeps in its dev directory.
        webhook_secret = (
            os.environ.get("ORDERS_PAYMENT_WEBHOOK_SECRET") or (dev_dir / "payment_webhook_secret").read_text().strip()
        )
        provider_cmd = [
            sys.executable,
            str(HERE / "provider.py"),
            "--api",
            api,
            "--port",
            str(provider_port),
            "--origin",
            page,
        ]
        provider_proc = subprocess.Popen(
            provider_cmd, env={**os.environ, "ORDERS_PAYMENT_WEBHOOK_SECRET": webhook_secret}
        )
        procs.append(provider_proc)
        try:
            wait_for_http(f"{provider}/healthz", provider_proc, 30)
        except (RuntimeError, TimeoutError) as exc:
            sys.exit(str(exc))
        vite = HERE / "node_modules" / ".bin" / "vite"
        procs.append(subprocess.Popen([str(vite), "preview", "--port", str(page_port), "--strictPort"], cwd=HERE))
        # Read as the service reads them (environment, then .env): the page shows the deadline.
        settings = Settings(dev=True, jwt_secret=secret, payment_webhook_secret=webhook_secret)  # type: ignore[call-arg]
        token = mint(settings, "demo-customer", ttl_s=86400)
        query = {
            "api": api,
            "provider": provider,
            "payment_timeout_s": f"{settings.payment_timeout_s:g}",
            "token": token,
        }
        print(f"\n  checkout page  {page}/?{urlencode(query)}\n", flush=True)
        while all(p.poll() is None for p in procs):
            time.sleep(0.5)
        # One ended first: on Ctrl-C the terminal's SIGINT may reach it before this process.
        ended = [p.returncode for p in procs if p.returncode is not None]
        return 0 if all(code in (0, -signal.SIGINT, 130) for code in ended) else 1
    except KeyboardInterrupt:
        return 0
    finally:
        # A terminal's Ctrl-C reached them too: give them a moment before asking (once: a second
        # SIGINT makes uvicorn quit at once); orders dev stops its embedded servers on SIGINT.
        deadline = time.monotonic() + 5
        for proc in reversed(procs):
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGINT)
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    sys.exit(main())
