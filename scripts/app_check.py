"""Drive ``flashdistill app`` in headless Chromium (Playwright with Debian's ``chromium``): type a
prompt, click generate, wait for the student's and the teacher's images. Prints the time from the
click to the student's image, and writes a screenshot with ``--screenshot``.

    python scripts/app_check.py --model runs/demo/flash --screenshot docs/app.png

The end-to-end test (tests/test_app.py) uses :func:`serve` and :func:`drive` too.
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        raise RuntimeError("no chromium on PATH: install Debian's package (apt-get install chromium; scripts/test.sh "
                           "does it), Playwright's own browser download is not reachable here")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(model: str, port: int, teacher: str | None = None, timeout: float = 180.0) -> subprocess.Popen:
    """Start ``flashdistill app`` and wait until the page answers."""
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "flashdistill.cli", "app", "--model", str(model), "--port", str(port)]
    if teacher:
        cmd += ["--teacher", str(teacher)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"flashdistill app exited with {proc.returncode}:\n{proc.stdout.read()}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
            return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"flashdistill app did not answer on port {port} within {timeout:.0f} s")


def drive(url: str, prompt: str, seed: int, screenshot: str | None = None, compare: bool = True) -> dict:
    """One generation through the page; returns the PNG bytes of both images, the seconds from the
    click to the student's image and to the teacher's, and the latency line."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 1100})
            page.goto(url)
            page.locator("#prompt textarea, #prompt input").first.fill(prompt)
            page.locator("#seed input").first.fill(str(seed))
            if not compare:
                page.locator("#compare input").first.uncheck()
            t0 = time.perf_counter()
            page.locator("#generate").click()
            page.locator("#student-image img[src]").first.wait_for(timeout=60_000)
            to_student = time.perf_counter() - t0
            out = {"seconds_to_student": to_student, "teacher_png": None, "seconds_to_teacher": None}
            out["student_png"] = page.request.get(page.locator("#student-image img[src]").first.get_attribute("src")).body()
            if compare:
                page.locator("#teacher-image img[src]").first.wait_for(timeout=120_000)
                out["seconds_to_teacher"] = time.perf_counter() - t0
                out["teacher_png"] = page.request.get(page.locator("#teacher-image img[src]").first.get_attribute("src")).body()
                page.wait_for_function("document.querySelector('#latency').innerText.includes('teacher')", timeout=60_000)
            out["latency"] = page.locator("#latency").inner_text()
            if screenshot:
                page.screenshot(path=screenshot, full_page=True)
            return out
        finally:
            browser.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="run folder")
    ap.add_argument("--teacher", default=None)
    ap.add_argument("--prompt", default="a handwritten digit seven")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=3, help="clicks to time (the first includes warm-up)")
    ap.add_argument("--screenshot", default=None, help="PNG to write after the last round")
    args = ap.parse_args()
    port = free_port()
    proc = serve(args.model, port, args.teacher)
    try:
        for i in range(args.rounds):
            last = i == args.rounds - 1
            r = drive(f"http://127.0.0.1:{port}/", args.prompt, args.seed + i, args.screenshot if last else None)
            print(f"round {i + 1}: student image {r['seconds_to_student']:.2f} s after the click, teacher "
                  f"{r['seconds_to_teacher']:.2f} s; page says: {r['latency']}")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


if __name__ == "__main__":
    main()
