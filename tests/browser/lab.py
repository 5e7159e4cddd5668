"""JupyterLab in headless Chromium for the browser tier: a private server, a browser, and page helpers.

The server is the project's own `jupyter lab` (this interpreter's), on a free localhost port with a
random token, with empty config, runtime, settings and workspace folders: no user settings leak in.
The browser is Debian's Chromium driven by Playwright's Python API through `executable_path` (Playwright
never downloads a browser here), with the flags this closed network needs (no background connections).
The page helpers use the JupyterLab application object (`--LabApp.expose_app_in_browser`, as JupyterLab's
own Galata tests do) for what a menu would do (run all cells), and real mouse and keyboard input on widgets.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

#: Debian's Chromium (`apt-get install -y chromium`); FLOWLIB_CHROMIUM names another binary.
CHROMIUM = os.environ.get("FLOWLIB_CHROMIUM", "/usr/bin/chromium")
#: Headless as root on a closed network: without the background-networking flags Chromium keeps
#: opening connections the network refuses.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",  # containers often have a tiny /dev/shm
]


def chromium_missing() -> str:
    """Why the browser tier cannot run here ('' when it can)."""
    if not (shutil.which(CHROMIUM) or Path(CHROMIUM).is_file()):
        return f"Chromium not found at {CHROMIUM} (apt-get install -y chromium; .ci/run installs it)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed (pip install -r requirements.txt)"
    return ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LabServer:
    """`jupyter lab` serving `root`, started in its own process group and stopped with everything it started."""

    def __init__(self, root: Path, home: Path, env: dict[str, str], log: Path):
        self.root, self.port, self.token = Path(root), free_port(), secrets.token_hex(16)
        dirs = {name: home / name for name in ("config", "data", "runtime", "settings", "workspaces")}
        for folder in dirs.values():
            folder.mkdir(parents=True, exist_ok=True)
        self.env = {
            **os.environ,
            **env,
            "JUPYTER_CONFIG_DIR": str(dirs["config"]),
            "JUPYTER_RUNTIME_DIR": str(dirs["runtime"]),
            "JUPYTERLAB_SETTINGS_DIR": str(dirs["settings"]),
            "JUPYTERLAB_WORKSPACES_DIR": str(dirs["workspaces"]),
            "JUPYTER_DATA_DIR": str(dirs["data"]),  # the venv's kernels are still found (sys.prefix)
            "JUPYTER_PLATFORM_DIRS": "1",
        }
        # No announcements fetched, no update check: nothing leaves localhost, no notification covers the page.
        lab_config = {
            "LabApp": {
                "news_url": None,
                "check_for_updates_class": "jupyterlab.NeverCheckForUpdate",
                "extension_manager": "readonly",
            }
        }
        (dirs["config"] / "jupyter_lab_config.json").write_text(json.dumps(lab_config))
        # ... and no "receive Jupyter news?" notification over the explorers in the screenshots.
        (dirs["config"] / "labconfig").mkdir(exist_ok=True)
        page_config = {"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}}
        (dirs["config"] / "labconfig" / "page_config.json").write_text(json.dumps(page_config))
        self.log = log
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 120) -> LabServer:
        command = [
            sys.executable,
            "-m",
            "jupyterlab",
            "--no-browser",
            "--ServerApp.ip=127.0.0.1",
            f"--ServerApp.port={self.port}",
            "--ServerApp.port_retries=0",
            f"--IdentityProvider.token={self.token}",
            f"--ServerApp.root_dir={self.root}",
            "--LabApp.expose_app_in_browser=True",
            *(["--allow-root"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []),  # CI runs as root
        ]
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                command, cwd=self.root, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"jupyter lab exited with {self.process.returncode}; see {self.log}")
            try:
                self.api("GET", "/api/status")
                return self
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"jupyter lab did not answer within {timeout} s; see {self.log}")

    def api(self, method: str, path: str):
        request = urllib.request.Request(
            f"{self.url}{path}", method=method, headers={"Authorization": f"token {self.token}"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            body = response.read()
        return json.loads(body) if body else None

    def shutdown_kernels(self) -> None:
        """Stop every kernel session (one notebook's kernel at a time keeps two cores free for the next)."""
        for session in self.api("GET", "/api/sessions"):
            self.api("DELETE", f"/api/sessions/{session['id']}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)  # the server and the kernels it started
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)


# --- page helpers (JupyterLab 4 DOM and application API) ---------------------------------------------------

KERNEL_IDLE = """() => {
    const panel = window.jupyterapp && window.jupyterapp.shell.currentWidget;
    const session = panel && panel.sessionContext && panel.sessionContext.session;
    return Boolean(session && session.kernel && session.kernel.status === 'idle');
}"""

RUN_ALL = """() => {
    window.__flowlibRun = {done: false, ok: null};
    window.jupyterapp.commands.execute('notebook:run-all-cells').then(
        ok => { window.__flowlibRun = {done: true, ok: ok}; },
        err => { window.__flowlibRun = {done: true, ok: false, error: String(err)}; });
}"""

RUN_DONE = """() => {
    const panel = window.jupyterapp.shell.currentWidget;
    const kernel = panel.sessionContext.session.kernel;
    return window.__flowlibRun.done && kernel.status === 'idle';
}"""

CELL_OUTPUTS = """() => {
    const cells = window.jupyterapp.shell.currentWidget.content.model.cells;
    const found = [];
    for (let i = 0; i < cells.length; i++) {
        const cell = cells.get(i);
        if (cell.type !== 'code') continue;
        found.push({index: i, count: cell.executionCount, outputs: cell.outputs.toJSON()});
    }
    return found;
}"""

NOTEBOOK_HEIGHT = """() => {
    const panel = window.jupyterapp.shell.currentWidget.content.node;
    const inner = panel.querySelector('.jp-WindowedPanel-inner') || panel;
    return inner.scrollHeight;
}"""

SCROLL_TO_TOP = """() => {
    const panel = window.jupyterapp.shell.currentWidget.content.node;
    for (const node of [panel, ...panel.querySelectorAll('.jp-WindowedPanel-outer')]) node.scrollTop = 0;
}"""


def open_notebook(page, server: LabServer, name: str, timeout_s: float = 120) -> str:
    """Open `name` in a fresh workspace; wait for its kernel to be idle; return the kernel's name."""
    page.goto(f"{server.url}/lab/tree/{name}?reset&token={server.token}")
    page.wait_for_selector(".jp-Notebook", timeout=timeout_s * 1000)
    page.wait_for_function(KERNEL_IDLE, timeout=timeout_s * 1000, polling=250)
    return page.evaluate("() => window.jupyterapp.shell.currentWidget.sessionContext.session.kernel.name")


def run_all_cells(page, timeout_s: float) -> float:
    """Run all cells as Run > Run All Cells does; the seconds until the last cell finished."""
    start = time.monotonic()
    page.evaluate(RUN_ALL)
    page.wait_for_function(RUN_DONE, timeout=timeout_s * 1000, polling=250)
    return time.monotonic() - start


def png_sources(page, selector: str) -> list[bytes]:
    """The PNG bytes of every visible data-URL image under `selector`, in page order."""
    sources = page.eval_on_selector_all(
        selector,
        """imgs => imgs.filter(i => i.complete && i.naturalWidth > 0 && i.getBoundingClientRect().width > 0)
                        .map(i => i.getAttribute('src'))""",
    )
    return [base64.b64decode(s.split(",", 1)[1]) for s in sources if s and s.startswith("data:image/png;base64,")]


def screenshot_whole_notebook(page, path: Path, check=None, width: int = 1400, max_height: int = 16000) -> None:
    """A screenshot of the whole notebook: the viewport grows to the notebook's height for the shot.

    `check()`, if given, runs while every cell is in view (JupyterLab lays out only what is near the view).
    """
    before = page.viewport_size
    height = min(max_height, int(page.evaluate(NOTEBOOK_HEIGHT)) + 300)
    page.set_viewport_size({"width": width, "height": max(height, before["height"])})
    page.evaluate(SCROLL_TO_TOP)
    page.wait_for_timeout(500)  # layout and image decoding after the resize
    page.screenshot(path=str(path))
    try:
        if check is not None:
            check()
    finally:
        page.set_viewport_size(before)
