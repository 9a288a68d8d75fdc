"""The dashboard in a real browser: `streamlit run` on a free port, headless Chromium through chromedriver,
against a real redis-server seeded with a small farm. Skips (with the reason) only where Chromium or its
driver is not installed; .ci/run installs both."""

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from renderfarm.cluster.keys import Keys
from renderfarm.cluster.processes import free_port
from renderfarm.cluster.redis_server import connect
from renderfarm.cluster.store import Store
from renderfarm.jobs import Job, JobSpec

pytestmark = pytest.mark.integration

APP = Path(__file__).resolve().parents[2] / "renderfarm" / "dashboard" / "app.py"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
DRIVER = shutil.which("chromedriver")


def _seed(redis_url: str, prefix: str) -> Store:
    store = Store(connect(redis_url), Keys(prefix))
    now = time.time()
    for name, vram, gpu in [("quadro-24g", 24, "Quadro RTX 6000"), ("rtx-8g", 8, "GeForce RTX 3070")]:
        store.register_node(name, {"gpu": gpu, "vram_gib": vram, "simulated": True, "state": "idle",
                                   "loaded": [], "profiles": {}, "images": 0, "jobs_done": 0})
    jobs = [Job(id=f"browser-{i}", spec=JobSpec(model="tiny-sd15", prompt=f"p{i}", width=64, height=64, steps=2),
                created_at=now) for i in range(7)]
    store.submit(jobs, "browser-batch")
    return store


def _wait_healthy(port: int, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"streamlit exited with {proc.returncode}: {proc.stdout.read().decode()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"streamlit did not answer on port {port} within {timeout} s")


@pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="Chromium and chromedriver are not installed "
                    "(Debian: apt-get install chromium chromium-driver; .ci/run installs them)")
def test_the_dashboard_renders_in_headless_chromium(redis_url, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    prefix = "browser"
    store = _seed(redis_url, prefix)
    port = free_port()
    env = {**os.environ, "RENDERFARM_REDIS_URL": redis_url, "HOME": str(tmp_path)}
    env.pop("RENDERFARM_DASHBOARD_TOKEN", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", str(APP), "--server.port", str(port), "--server.address",
         "127.0.0.1", "--server.headless", "true", "--browser.gatherUsageStats", "false", "--", "--prefix", prefix],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )
    driver = None
    try:
        _wait_healthy(port, proc)
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1400,2200", f"--user-data-dir={tmp_path / 'chrome'}"):
            options.add_argument(flag)
        driver = webdriver.Chrome(service=Service(DRIVER), options=options)
        driver.get(f"http://127.0.0.1:{port}/")

        def rendered(d):
            text = d.find_element(By.TAG_NAME, "body").text
            return text if all(s in text for s in ("Queue", "Queued", "quadro-24g", "rtx-8g")) else False

        text = WebDriverWait(driver, 90, poll_frequency=0.5).until(rendered)
        shot = tmp_path / "dashboard.png"
        assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
        assert "Nodes" in text and "Jobs" in text
        assert "Redis unreachable" not in text
        # The queued count the page shows is the seeded one.
        metrics = driver.find_elements(By.CSS_SELECTOR, '[data-testid="stMetric"]')
        queued = [m.text for m in metrics if m.text.startswith("Queued")]
        assert queued and queued[0].split()[-1] == str(store.counts()["queued"]) == "7"
    finally:
        if driver is not None:
            driver.quit()
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for key in store.redis.scan_iter(f"{prefix}:*"):
            store.redis.delete(key)
