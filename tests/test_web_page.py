"""The support page in a real browser: headless Chromium against uvicorn on loopback.

Skips when Chromium is absent (Debian's ``chromium`` package: ``apt-get install -y chromium``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse

import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from conftest import tiny_bert  # noqa: E402
from mtpeft.serve import create_app  # noqa: E402
from mtpeft.support import SupportPipeline  # noqa: E402
from tiny_bundle import FAQ, support_model  # noqa: E402

CHROMIUM = os.environ.get("MTPEFT_CHROMIUM", "/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run", "--disable-dev-shm-usage", "--hide-scrollbars"]

pytestmark = pytest.mark.skipif(not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)),
                                reason=f"headless Chromium not found at {CHROMIUM} (apt-get install -y chromium, "
                                       "or set MTPEFT_CHROMIUM)")


@contextlib.contextmanager
def _served(app):
    """``app`` under uvicorn on a free loopback port; yields its URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # a free port, held until uvicorn takes the socket
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            pytest.fail("uvicorn did not start within 30 s")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@pytest.fixture(scope="module")
def server_url(tokenizer):
    model = support_model(tiny_bert(tokenizer))
    with _served(create_app(model, support=SupportPipeline(model, FAQ, top_k=2))) as url:
        yield url


def _chromium(tmp_path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / "profile"
    return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True, text=True,
                          timeout=120)


def test_page_renders_the_three_results(server_url, tmp_path):
    url = f"{server_url}/?message={urllib.parse.quote('How do I return an item?')}"
    # Virtual time lets the page's fetch to /v1/support finish before the DOM is dumped.
    result = _chromium(tmp_path, "--virtual-time-budget=30000", "--dump-dom", url)
    dom = result.stdout
    assert "<h1>Customer support assistant</h1>" in dom, result.stderr[-2000:]
    assert 'data-state="done"' in dom, dom[-3000:]
    assert 'id="sentiment-label"' in dom and dom.count("<li>") == 2
    assert "From: " in dom and ("<mark>" in dom) != ("No confident answer" in dom)


def test_page_screenshot(server_url, tmp_path):
    shot = tmp_path / "page.png"
    _chromium(tmp_path, "--virtual-time-budget=30000", "--window-size=900,1100", f"--screenshot={shot}",
              f"{server_url}/?message=refund")
    assert shot.is_file() and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 5000
    if os.environ.get("MTPEFT_KEEP_SCREENSHOT"):
        shutil.copy(shot, os.environ["MTPEFT_KEEP_SCREENSHOT"])


def test_the_answer_is_marked_where_it_is_after_characters_outside_the_bmp(tokenizer, tmp_path):
    """The API's offsets count code points; JavaScript's slice() counts UTF-16 units, two per emoji."""
    model = support_model(tiny_bert(tokenizer))
    faq = [{"question": "📦📦 Where is my parcel?", "context": "📦📦📦 Your parcel arrives within three days of the order."}]
    with _served(create_app(model, support=SupportPipeline(model, faq, answer_threshold=0.0))) as url:
        dom = _chromium(tmp_path, "--virtual-time-budget=30000", "--dump-dom", f"{url}/?message=where%20is%20my%20parcel").stdout
    reply = SupportPipeline(model, faq, answer_threshold=0.0).answer("where is my parcel")
    assert reply.answer.text and f"<mark>{reply.answer.text}</mark>" in dom, dom[-2000:]
