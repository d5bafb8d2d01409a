"""`make demo`: `orders dev` (what `make run` starts: embedded PostgreSQL, Redis and SMTP sink,
demo catalog) with CORS for the checkout page, and the built page served by `vite preview` on
its own origin. Prints the page's address, which carries a demo customer token (?token=).
Ctrl-C stops both. DEMO_API_PORT (8000) and DEMO_PAGE_PORT (5173) move them."""

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
    api, page = f"http://127.0.0.1:{api_port}", f"http://127.0.0.1:{page_port}"
    # A secret of the demo's own unless one is set, so that it can mint the page's token.
    secret = os.environ.get("ORDERS_JWT_SECRET") or secrets.token_urlsafe(48)
    origins = ",".join(filter(None, [os.environ.get("ORDERS_CORS_ORIGINS"), page]))
    env = {**os.environ, "ORDERS_JWT_SECRET": secret, "ORDERS_CORS_ORIGINS": origins}
    procs: list[subprocess.Popen[bytes]] = []
    try:
        service = subprocess.Popen([sys.executable, "-m", "orders", "dev", "--port", str(api_port)], env=env)
        procs.append(service)
        try:
            wait_for_http(f"{api}/readyz", service, 120)
        except (RuntimeError, TimeoutError) as exc:
            sys.exit(str(exc))
        vite = HERE / "node_modules" / ".bin" / "vite"
        procs.append(subprocess.Popen([str(vite), "preview", "--port", str(page_port), "--strictPort"], cwd=HERE))
        settings = Settings(_env_file=None, dev=True, jwt_secret=secret)  # type: ignore[call-arg]
        token = mint(settings, "demo-customer", ttl_s=86400)
        print(f"\n  checkout page  {page}/?{urlencode({'api': api, 'token': token})}\n", flush=True)
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
