"""The web page at / (fluxframe/serve/web/index.html) in a real headless browser (Debian's chromium through
playwright) against a real uvicorn server over a tiny deployment that filters, watermarks and signs: the token
field, generating with live progress from the event stream, the result image and its verification panel, a
blocked prompt with its reasons, the job list, the drop zone, API errors shown, and the token kept out of URLs.

Set FLUXFRAME_SCREENSHOT=path to also save the page after a finished job (docs/serve.png is made that way).
"""

from __future__ import annotations

import base64
import io
import os
import shutil
import threading
import time

import pytest
from PIL import Image

CHROMIUM = shutil.which("chromium")
WAIT_MS = 20_000  # the longest any one thing on the page may take

DEPLOY = """[model]\npreset = "tiny"\ndtype = "float32"\ndevice = "cpu"
[sampler]\nsteps = 2\nwidth = 256\nheight = 256
[safety]\naudit_log = "audit.jsonl"\nrequire = ["prompt-nsfw"]
[output]\ndir = "out"
[provenance.watermark]\nmethod = "dwtDct"
[provenance.c2pa]\ncertificate = "certs/chain.pem"\nprivate_key = "certs/key.pem"
[serve]\ntrust = ["certs/ca.pem"]
"""


def browser_api():
    if CHROMIUM is None:
        pytest.skip("no chromium on PATH (Debian: apt-get install chromium)")
    try:
        from playwright.sync_api import expect, sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed")
    expect.set_options(timeout=WAIT_MS)
    return sync_playwright, expect


class Server:
    """uvicorn serving ``app`` on a free loopback port in a background thread."""

    def __init__(self, app):
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        self.url = "http://127.0.0.1:%d" % self.server.servers[0].sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    browser_api()  # skip before loading anything
    import httpx

    from fluxframe import api
    from fluxframe.provenance.certs import make_dev_certificates
    from fluxframe.serve.app import create_app
    from fluxframe.serve.service import Service

    root = tmp_path_factory.mktemp("serve-web")
    make_dev_certificates(root / "certs")
    (root / "deploy.toml").write_text(DEPLOY)
    service = Service(api.load_config(root / "deploy.toml"))
    token = service.store.add_token("browser")
    with Server(create_app(service)) as server:
        client = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {token}"}, timeout=30)
        deadline = time.monotonic() + 60
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline and not service.load_error, service.load_error or "not ready in 60 s"
            time.sleep(0.1)
        server.service, server.token, server.client = service, token, client
        yield server
        client.close()


def png(size=(64, 64), colour="teal") -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, format="PNG")
    return out.getvalue()


def test_generate_verify_block_and_list_in_a_browser(web):
    sync_playwright, expect = browser_api()
    seen, page_errors = [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.set_default_timeout(WAIT_MS)
            page.on("request", lambda r: seen.append((r.url, r.headers.get("authorization"))))
            page.on("pageerror", lambda e: page_errors.append(str(e)))
            page.goto(web.url + "/")
            alert = page.locator("#alert")
            expect(page.locator("#token")).to_be_visible()

            # API errors are shown as the API words them: a wrong token, then a bad setting
            page.fill("#token", "not-a-token")
            page.fill("#prompt", "a red circle on a blue background")
            page.click("#generate")
            expect(alert).to_contain_text("a valid bearer token is required")
            page.fill("#token", web.token)
            page.fill("#width", "7")
            page.click("#generate")
            expect(alert).to_contain_text("width: must be between 16 and 4096, got 7")

            # a job: progress to the end, the image, its verification
            page.fill("#width", "")
            page.fill("#seed", "3")
            page.click("#generate")
            expect(page.locator("#job-status")).to_have_text("Done", timeout=2 * WAIT_MS)  # loads the weights
            expect(alert).to_be_empty()
            assert page.eval_on_selector("#progress", "p => p.max >= 1 && p.value === p.max")
            image = page.locator("#result-image")
            expect(image).to_be_visible()
            assert image.get_attribute("src").startswith("blob:")
            page.wait_for_function("document.getElementById('result-image').naturalWidth === 256", timeout=WAIT_MS)
            report = page.locator("#result-report")
            expect(report.locator(".verdict")).to_have_text("✓ Verified")
            expect(report.locator('[data-field="Signer"]')).to_contain_text("fluxframe dev signing")
            expect(report.locator('[data-field="Signature"]')).to_have_text("valid, signer trusted")
            expect(report.locator('[data-field="AI-generated"]')).to_contain_text("yes, declared")
            expect(report.locator('[data-field="Watermark"]')).to_contain_text("found (dwtDct")
            expect(report.locator("table.filters tbody tr")).to_have_count(1)
            expect(report.locator("table.filters tbody td")).to_have_text(
                ["prompt-nsfw", "prompt", "allowed", "no category reached its threshold"])
            expect(page.locator("#jobs tbody tr[data-job]")).to_have_count(1)
            if os.environ.get("FLUXFRAME_SCREENSHOT"):
                page.screenshot(path=os.environ["FLUXFRAME_SCREENSHOT"])

            # a blocked prompt: its reasons, no image
            page.fill("#prompt", "a n4ked w o m a n, nsfw")
            page.click("#generate")
            expect(page.locator("#job-status")).to_have_text("Blocked")
            expect(page.locator("#result-status")).to_contain_text("blocked")
            expect(page.locator("#result-reasons")).to_contain_text("prompt-nsfw on prompt: sexual")
            expect(page.locator("#result-image")).to_have_count(0)
            expect(page.locator("#result-report")).to_be_empty()

            # the job list has both, as the API lists them
            jobs = web.client.get("/v1/jobs").json()["jobs"]
            rows = page.locator("#jobs tbody tr[data-job]")
            expect(rows).to_have_count(2)
            assert [(r.get_attribute("data-job"), r.get_attribute("data-status")) for r in rows.all()] == [
                (j["id"], j["status"]) for j in jobs]
            assert [j["status"] for j in jobs] == ["blocked", "done"]
            expect(rows.nth(0)).to_contain_text("prompt-nsfw on prompt")
            expect(rows.nth(1)).to_contain_text(jobs[1]["prompt"])  # each row names its prompt
            page.click(f'#jobs button[data-show="{jobs[1]["id"]}"]')  # shows the done job again
            expect(page.locator("#result-report .verdict")).to_have_text("✓ Verified")

            # the drop zone: a chosen file (the released image), a dropped unsigned one, one that is no image
            released = web.client.get(jobs[1]["result"]["image"]).content
            page.set_input_files("#verify-file", files=[
                {"name": "released.png", "mimeType": "image/png", "buffer": released}])
            verify = page.locator("#verify-report")
            expect(verify.locator("h3")).to_have_text("released.png")
            expect(verify.locator(".verdict")).to_have_text("✓ Verified")
            expect(verify.locator('[data-field="Watermark"]')).to_contain_text("found")
            dropped = page.evaluate_handle("""b64 => { const t = new DataTransfer();
                t.items.add(new File([Uint8Array.from(atob(b64), c => c.charCodeAt(0))], "plain.png",
                                     {type: "image/png"}));
                return t; }""", base64.b64encode(png()).decode())
            page.dispatch_event("#drop", "drop", {"dataTransfer": dropped})
            expect(verify.locator("h3")).to_have_text("plain.png")
            expect(verify.locator(".verdict")).to_have_text("✗ Not verified")
            expect(verify.locator('[data-field="Signature"]')).to_contain_text("no C2PA manifest")
            expect(verify.locator('[data-field="Watermark"]')).to_contain_text("not found")
            page.set_input_files("#verify-file", files=[
                {"name": "notes.txt", "mimeType": "text/plain", "buffer": b"not an image"}])
            expect(alert).to_contain_text("Verify notes.txt: ")

            # the token lives in sessionStorage: still there after a reload
            assert page.evaluate("sessionStorage.getItem('fluxframe-token')") == web.token
            page.reload()
            expect(page.locator("#token")).to_have_value(web.token)
            expect(page.locator("#jobs tbody tr[data-job]")).to_have_count(2)
        finally:
            browser.close()
    assert not page_errors
    assert seen and all(url.startswith((web.url + "/", "blob:")) for url, _ in seen)  # nothing from elsewhere
    assert not [url for url, _ in seen if web.token in url]
    api_calls = [(url, auth) for url, auth in seen if url.startswith(web.url + "/v1/")]
    assert {url.removeprefix(web.url).split("?")[0].split("/")[2] for url, _ in api_calls} == {"images", "jobs",
                                                                                              "verify"}
    assert all(auth and auth.startswith("Bearer ") for _, auth in api_calls)


def test_without_auth_the_page_has_no_token_field(web):
    """A server run with --insecure-no-auth: no token field, no Authorization header, and the page still works."""
    from fluxframe.serve.app import create_app

    sync_playwright, expect = browser_api()
    seen = []
    with Server(create_app(web.service, insecure_no_auth=True, start=False)) as server, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.set_default_timeout(WAIT_MS)
            page.on("request", lambda r: seen.append(r.headers.get("authorization")))
            page.goto(server.url + "/")
            expect(page.locator("#jobs tbody")).to_have_text("No jobs yet.")
            expect(page.locator("#token")).to_be_hidden()
            page.fill("#prompt", "a green square")
            page.click("#generate")
            expect(page.locator("#job-status")).to_have_text("Done")
            expect(page.locator("#result-image")).to_be_visible()
            expect(page.locator("#jobs tbody tr[data-job]")).to_have_count(1)
        finally:
            browser.close()
    assert seen and not any(seen)
