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
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlencode

from orders.auth import mint
from orders.settings import Settings

HERE = Path(__file__).resolve().parent


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"orders dev exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(0.3)
    sys.exit(f"{url} not ready within {timeout} s")


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
        wait_ready(f"{api}/readyz", service)
        vite = HERE / "node_modules" / ".bin" / "vite"
        procs.append(subprocess.Popen([str(vite), "preview", "--port", str(page_port), "--strictPort"], cwd=HERE))
        settings = Settings(_env_file=None, dev=True, jwt_secret=secret)  # type: ignore[call-arg]
        token = mint(settings, "demo-customer", ttl_s=86400)
        print(f"\n  checkout page  {page}/?{urlencode({'api': api, 'token': token})}\n", flush=True)
        while all(p.poll() is None for p in procs):
            time.sleep(0.5)
        return 1
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
