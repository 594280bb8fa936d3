"""The page at / in a real headless browser (Debian's chromium, driven by playwright): register a task from pasted
JSONL, type an input, read the prediction and its probability bars back."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from serve_helpers import Server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# docs/SERVING.md's picture: MANYICL_PAGE_SCREENSHOT=docs/serve_page.png MANYICL_PAGE_MODEL=smollm2-135m
# MANYICL_PAGE_DEMOS=<the first lines of sst2's train.jsonl> (by default: the tiny model and made-up samples)
SCREENSHOT = os.environ.get("MANYICL_PAGE_SCREENSHOT")
MODEL = os.environ.get("MANYICL_PAGE_MODEL")
DEMOS = os.environ.get("MANYICL_PAGE_DEMOS")


@pytest.mark.slow
def test_register_and_predict_through_the_page(tiny_model_dir, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install "
                                                                   "playwright; its own browser is not needed)")
    if CHROMIUM is None:
        pytest.skip("no chromium on this machine: apt-get install chromium (scripts/test.sh does where it can)")
    demos = "\n".join(json.dumps({"input": f"sample {i} {'good' if i % 2 else 'bad'}",
                                  "output": "positive" if i % 2 else "negative"}) for i in range(12))
    if DEMOS:
        demos = Path(DEMOS).read_text()
    server = Server(MODEL or tiny_model_dir, tmp_path / "state")
    try:
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=[
                "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync"])
            page = browser.new_page()
            page.goto(server.url + "/")
            page.fill("#name", "reviews")
            page.fill("#demos", demos)
            page.click("#register")
            page.wait_for_function("document.getElementById('status').textContent.startsWith('registered')")
            assert "registered reviews" in page.text_content("#status")
            page.fill("#inputs", "a good sample\na bad one" if not DEMOS else
                      "a gorgeous, witty film that never lets up\nthe plot is a tired mess and the jokes fall flat")
            page.click("#predict")
            page.wait_for_selector("tr.prediction")
            labels = page.locator("tr.prediction td.label").all_text_contents()
            assert len(labels) == 2 and set(labels) <= {"positive", "negative"}
            assert page.locator("tr.prediction .bar").count() == 4  # a bar per label per input
            if SCREENSHOT:
                Path(SCREENSHOT).parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=SCREENSHOT, full_page=True)
            browser.close()
        # what the page registered is the task the API serves
        import httpx

        detail = httpx.get(server.url + "/v1/tasks/reviews").json()
        assert 0 < detail["shots"] == sum(detail["label_histogram"].values())
        assert set(detail["label_histogram"]) == {"negative", "positive"}
    finally:
        server.stop()
