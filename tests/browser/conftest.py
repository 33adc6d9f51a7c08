"""Fixtures for the browser check: Chromium + chromedriver paths, and a JupyterLab server.

Skips cleanly when Chromium, chromedriver or selenium is missing. The server runs on 127.0.0.1
with a random free port and a random token, in a temporary folder with its own runtime,
settings and workspace folders, and is always shut down (its kernels with it).
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("SLC_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("SLC_CHROMEDRIVER", "/usr/bin/chromedriver")


@pytest.fixture(scope="session")
def browser_paths() -> tuple[str, str]:
    """Skip where Chromium or chromedriver is absent; once both are there the check runs and can fail."""
    for path, what in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromedriver")):
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            pytest.skip(f"{what} not found at {path} (apt-get install chromium chromium-driver)")
    try:
        import selenium  # noqa: F401
    except ImportError:
        pytest.fail("Chromium is installed but selenium is not: pip install -e '.[dev]'")
    return CHROMIUM, CHROMEDRIVER


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 5.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0


class LabServer:
    """`jupyter lab` in its own process group; `url(path)` adds the token."""

    def __init__(self, root: Path):
        self.root, self.port, self.token = root, free_port(), secrets.token_hex(16)
        home = root.parent / "jupyter-home"
        env = {**os.environ,
               "JUPYTER_RUNTIME_DIR": str(home / "runtime"), "JUPYTER_CONFIG_DIR": str(home / "config"),
               "JUPYTERLAB_SETTINGS_DIR": str(home / "settings"), "JUPYTERLAB_WORKSPACES_DIR": str(home / "workspaces"),
               "HF_HUB_DISABLE_PROGRESS_BARS": "1", "PYTHONUNBUFFERED": "1"}
        # user settings: render every cell (no virtual scrolling that drops off-screen outputs from
        # the DOM) and no news pop-up
        for rel, text in (
                ("@jupyterlab/notebook-extension/tracker.jupyterlab-settings", '{"windowingMode": "none"}'),
                ("@jupyterlab/apputils-extension/notification.jupyterlab-settings", '{"fetchNews": "false"}')):
            (home / "settings" / rel).parent.mkdir(parents=True, exist_ok=True)
            (home / "settings" / rel).write_text(text)
        self.log = open(root.parent / "lab.log", "w")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ServerApp.ip=127.0.0.1",
             f"--ServerApp.port={self.port}", "--ServerApp.port_retries=0",
             f"--IdentityProvider.token={self.token}", f"--ServerApp.root_dir={root}",
             "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
             "--LabApp.extension_manager=readonly"]            # no extension look-ups on the network
            + (["--allow-root"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []),  # CI runs as root
            cwd=root, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def url(self, path: str = "") -> str:
        sep = "&" if "?" in path else "?"
        return f"http://127.0.0.1:{self.port}/{path.lstrip('/')}{sep}token={self.token}"

    def api(self, path: str) -> object:
        """GET a Jupyter server REST endpoint (e.g. "api/sessions") and return its JSON."""
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/{path.lstrip('/')}",
                                     headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.load(r)

    def kernel_state(self, notebook: str) -> str | None:
        """The server's execution_state ("starting", "busy", "idle", ...) of the kernel behind a notebook.

        The server tracks it from the kernel's own status messages, whatever the page shows.
        None while no session for that notebook exists.
        """
        for s in self.api("api/sessions"):
            if s.get("path") == notebook and s.get("kernel"):
                return s["kernel"].get("execution_state")
        return None

    def wait_ready(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"jupyter lab exited with {self.proc.returncode}; see {self.log.name}")
            if _get(self.url("api/status")) == 200:
                return
            time.sleep(0.5)
        raise TimeoutError(f"jupyter lab did not answer within {timeout} s; see {self.log.name}")

    def stop(self) -> None:
        """Ask the server to shut down (it stops its kernels), then make sure its process group is gone."""
        if self.proc.poll() is None:
            try:
                req = urllib.request.Request(self.url("api/shutdown"), method="POST")
                urllib.request.urlopen(req, timeout=10).close()
                self.proc.wait(timeout=20)
            except (OSError, subprocess.TimeoutExpired):
                pass
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
            if self.proc.poll() is not None:
                break
            try:
                os.killpg(self.proc.pid, sig)
                self.proc.wait(timeout=wait)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        self.log.close()


@pytest.fixture
def lab(tmp_path):
    """A running JupyterLab whose root is a fresh folder (tmp_path / "work")."""
    root = tmp_path / "work"
    root.mkdir()
    server = LabServer(root)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture
def chrome(browser_paths, tmp_path):
    """Headless Chromium driven by the Debian chromedriver, with a fresh profile."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_AVOID_STATS", "true")
    chromium, chromedriver = browser_paths
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1400,1100",
                 f"--user-data-dir={tmp_path / 'chrome-profile'}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=chromedriver), options=opts)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(tmp_path / "chrome-profile", ignore_errors=True)
