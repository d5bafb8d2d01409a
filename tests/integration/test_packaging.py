"""The wheel carries only what serves: no dev tooling (orders.dev: `orders dev`, the embedded
servers), and its `orders dev` says in one line that the tooling is not installed."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`pip wheel --no-deps` of a copy of the sources (the build writes into its source tree)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT / "orders", src / "orders", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(tmp / "dist"), str(src)],
        capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr[-3000:]
    [path] = (tmp / "dist").glob("orders-*.whl")
    return path


def test_the_wheel_has_no_dev_tooling(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    modules = [n for n in names if n.startswith("orders/") and n.endswith(".py")]
    assert "orders/cli.py" in modules and "orders/db/migrate.py" in modules  # the product is there
    assert [n for n in names if n.startswith("orders/db/migrations/") and n.endswith(".sql")]
    dev = [n for n in names if n.startswith("orders/dev/") or "devservers" in n]
    assert dev == [], f"dev tooling in {wheel.name}: {dev}"


def test_orders_dev_from_the_wheel_says_in_one_line_that_it_is_not_there(wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "installed"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target), str(wheel)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr[-3000:]
    # The installed wheel first, then this venv's packages (its dependencies), without the
    # editable install's import hook (-S: no site), from a directory with no `orders/` in it.
    path = f"{target}:{sysconfig.get_paths()['purelib']}:{sysconfig.get_paths()['platlib']}"
    # Were the tooling there, this run would start no server and fail fast (nothing listens on port 1).
    unreachable = {"ORDERS_DATABASE_URL": "postgresql://postgres@127.0.0.1:1/x", "ORDERS_REDIS_URL": "redis://127.0.0.1:1/0",
                   "ORDERS_SMTP_HOST": "127.0.0.1", "ORDERS_SMTP_PORT": "1", "ORDERS_DEV_DIR": str(tmp_path / ".dev")}

    def python(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-S", *args], capture_output=True, text=True, timeout=60, cwd=tmp_path,
            env={"PYTHONPATH": path, "PATH": "/usr/bin:/bin", **unreachable}, check=False,
        )  # fmt: skip

    imported = python("-c", "import orders; print(orders.__file__)")
    assert imported.stdout.startswith(str(target)), imported
    run = python("-m", "orders", "dev")
    assert run.returncode != 0
    assert run.stdout == ""
    [line] = run.stderr.splitlines()
    assert "orders dev: the dev tooling is not installed" in line, run.stderr
