"""The explorer in a real browser: JupyterLab + headless Chromium (Debian's ``chromium``) through Playwright.

Starts JupyterLab on a free loopback port with no token, serving a temporary copy of
``notebooks/explorer_demo.ipynb``; opens it, runs the explorer cell, types a new seed, clicks Apply,
waits for the verify badge, saves a screenshot and checks the rendered text. The screenshot goes to
``$WORKBENCH_ARTIFACTS`` (default ``report/ci-artifacts/``), and also to ``docs/img/explorer.png``
(the widget alone) when ``WORKBENCH_UPDATE_SCREENSHOTS=1``. Skips where ``/usr/bin/chromium`` or Playwright is absent.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-quic"]
# Generous: on a loaded 2-core machine the kernel's first import of torch alone can take 20 s.
WAIT_MS = 120_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_lab(root: Path, port: int, log: Path) -> subprocess.Popen:
    home = root.parent
    # A config folder of its own; in it, the "official Jupyter news?" pop-up is off (it covers the page).
    labconfig = home / "config" / "labconfig"
    labconfig.mkdir(parents=True)
    (labconfig / "page_config.json").write_text(
        json.dumps({"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}}))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "JUPYTER_CONFIG_DIR": str(home / "config"),
           "JUPYTER_RUNTIME_DIR": str(home / "runtime"), "JUPYTER_PLATFORM_DIRS": "1"}
    command = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1",
               f"--ServerApp.port={port}", "--ServerApp.port_retries=0", "--IdentityProvider.token=",
               "--ServerApp.password=", f"--ServerApp.root_dir={root}",
               f"--LabApp.user_settings_dir={home / 'settings'}", f"--LabApp.workspaces_dir={home / 'workspaces'}",
               "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        command.append("--allow-root")
    # A session of its own, so the kernels it starts can be stopped with it.
    return subprocess.Popen(command, cwd=root, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def wait_for_server(server: subprocess.Popen, port: int, log: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"JupyterLab exited with {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"JupyterLab did not answer on port {port} within {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def stop(server: subprocess.Popen) -> None:
    """SIGTERM to the server's PID (it shuts its kernels down), then anything left in its session."""
    if server.poll() is None:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=10)
    try:
        os.killpg(server.pid, signal.SIGKILL)  # a kernel that outlived its server
    except (ProcessLookupError, PermissionError):
        pass


@pytest.mark.slow
def test_explorer_in_jupyterlab(tmp_path):
    if not CHROMIUM.exists():
        pytest.skip("no /usr/bin/chromium (install Debian's chromium: apt-get install -y chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (pip install playwright)")
    root = tmp_path / "lab"
    root.mkdir()
    shutil.copy(ROOT / "notebooks" / "explorer_demo.ipynb", root / "explorer_demo.ipynb")
    port, log = free_port(), tmp_path / "jupyterlab.log"
    artifacts = Path(os.environ.get("WORKBENCH_ARTIFACTS", ROOT / "report" / "ci-artifacts"))
    server = start_lab(root, port, log)
    try:
        wait_for_server(server, port, log)
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 1300})
                text = drive(page, sync_api.expect, port)
                artifacts.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(artifacts / "explorer.png"), full_page=True)
                if os.environ.get("WORKBENCH_UPDATE_SCREENSHOTS") == "1":  # the README's picture: the widget alone
                    (ROOT / "docs" / "img").mkdir(parents=True, exist_ok=True)
                    explorer_output(page).screenshot(path=str(ROOT / "docs" / "img" / "explorer.png"))
            finally:
                browser.close()
    finally:
        stop(server)
    assert "PASS" in text and "seed 3" in text and "max relative output difference" in text
    assert "matched order: mean |r| on the diagonal 1.000" in text
    assert "transformed, same index 0" in text and "matched to 0" in text


def explorer_output(page):
    """The explorer widget on the page (the outermost widget box holding the verify badge)."""
    return page.locator(".widget-vbox", has=page.locator(".wb-badge")).first


def drive(page, expect, port: int) -> str:
    """Open the notebook, run its first cells, set seed 3, Apply; returns the explorer's rendered text."""
    page.goto(f"http://127.0.0.1:{port}/lab/tree/explorer_demo.ipynb", timeout=WAIT_MS)
    status = page.locator("#jp-main-statusbar")
    expect(status).to_contain_text("Idle", timeout=WAIT_MS)
    page.locator(".jp-Notebook .jp-Cell").first.click()  # the title cell; Shift+Enter runs and moves on
    page.keyboard.press("Escape")
    for _ in range(3):  # title (markdown), imports and data, the explorer
        page.keyboard.press("Shift+Enter")
    apply = page.locator("button", has_text="Apply")
    expect(apply).to_be_visible(timeout=WAIT_MS)
    seed = page.locator(".widget-inline-hbox", has=page.locator("label", has_text="seed")).locator("input")
    seed.fill("3")
    seed.press("Enter")  # a text widget syncs its value on Enter
    apply.click()
    badge = page.locator(".wb-badge")
    explorer = explorer_output(page)
    expect(explorer).to_contain_text("seed 3", timeout=WAIT_MS)
    expect(badge).to_have_text("PASS", timeout=WAIT_MS)
    expect(explorer).to_contain_text("matched to 0", timeout=WAIT_MS)
    text = explorer.inner_text()
    # A click on the first heatmap's column 5 (one pixel per cell, 16 cells across 220 px) shows unit 5.
    image = explorer.locator("img.wb-pixelated").first
    box = image.bounding_box()
    image.click(position={"x": box["width"] * 5.5 / 16, "y": box["height"] * 0.5 / 16})
    expect(explorer).to_contain_text("original model, unit 5", timeout=5_000)  # well under a second when idle
    expect(explorer).to_contain_text("matched to 5", timeout=5_000)
    assert "PASS PASS" not in text and "writers 0;" not in text
    explorer.scroll_into_view_if_needed()
    return text
