"""The web page at `/`, driven in headless Chromium: pick or drop a real photo, see the top-5 the API returns."""
from __future__ import annotations

import base64
import shutil

import httpx
import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    """A Chromium page from Debian's browser (the Makefile's system-deps installs it); never downloads one."""
    from playwright.sync_api import sync_playwright

    if shutil.which(CHROMIUM) is None:
        raise FileNotFoundError(f"{CHROMIUM} is missing: run `make system-deps` (apt-get install chromium)")
    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_playwright() as playwright:
        # Playwright passes --user-data-dir itself for a persistent context: a fresh profile per test module.
        context = playwright.chromium.launch_persistent_context(str(profile), executable_path=CHROMIUM,
                                                                args=CHROMIUM_ARGS)
        yield context.pages[0] if context.pages else context.new_page()
        context.close()


def api_top5(url: str, data: bytes, content_type: str) -> list[str]:
    answer = httpx.post(f"{url}/classify?top_k=5", content=data, headers={"Content-Type": content_type})
    answer.raise_for_status()
    return [p["label"] for p in answer.json()["results"][0]["top_k"]]


def shown_labels(page, file_name: str) -> list[str]:
    page.get_by_role("status").filter(has_text=f"Classified {file_name}.").wait_for(timeout=15_000)
    return page.locator("#predictions li .label").all_inner_texts()


def drop_file(page, name: str, data: bytes, content_type: str, target: str = "#drop-zone") -> bool:
    """Dispatch real `dragover` and `drop` events on `target` carrying the file, as a person dragging it would; True
    when the page took the drop (cancelled its default: the browser would otherwise open the file in its place)."""
    return page.evaluate(
        """([name, b64, type, target]) => {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], name, { type }));
            const element = document.querySelector(target);
            const options = { dataTransfer: transfer, bubbles: true, cancelable: true };
            element.dispatchEvent(new DragEvent("dragover", options));
            return !element.dispatchEvent(new DragEvent("drop", options));
        }""",
        [name, base64.b64encode(data).decode(), content_type, target],
    )


def test_page_shows_the_served_model_and_the_apis_top5_for_a_picked_and_a_dropped_photo(page, service_url,
                                                                                      real_photos):
    page.goto(service_url + "/")
    models = httpx.get(f"{service_url}/models").json()["models"]
    serving = next(m for m in models if m["serving"])
    page.locator("#served").filter(has_text=f"Serving {serving['name']} version {serving['version']}").wait_for()
    # What the model is and knows: this one has random weights, so the page says its answers mean nothing.
    page.locator("#about").filter(has_text=serving["description"]["summary"]).wait_for()
    assert "random (untrained) weights" in page.inner_text("#about")
    page.keyboard.press("Tab")  # the picker is the first thing the keyboard reaches, and it has a label
    assert page.evaluate("document.activeElement.id") == "file-input"
    assert page.get_by_label("choose a file").count() == 1

    picked = real_photos[2]  # chelsea.png, a cat
    page.set_input_files("#file-input", str(picked))
    assert shown_labels(page, picked.name) == api_top5(service_url, picked.read_bytes(), "image/png")
    assert page.locator("#predictions li").count() == 5
    assert page.locator("#predictions [role=meter]").count() == 5
    assert f"Model {serving['name']} version {serving['version']}" in page.inner_text("#details")
    assert page.is_visible("#preview") and page.is_hidden("#error")
    page.screenshot(path="/tmp/web_page.png", full_page=True)

    dropped = real_photos[0]  # china.jpg, a temple
    assert drop_file(page, dropped.name, dropped.read_bytes(), "image/jpeg")
    assert shown_labels(page, dropped.name) == api_top5(service_url, dropped.read_bytes(), "image/jpeg")

    beside = real_photos[1]  # dropped on the page's heading, not the zone: classified too, the page stays
    assert drop_file(page, beside.name, beside.read_bytes(), "image/jpeg", target="h1")
    assert shown_labels(page, beside.name) == api_top5(service_url, beside.read_bytes(), "image/jpeg")


def test_a_second_file_aborts_the_first_ones_request_and_only_its_own_answer_is_shown(page, service_url,
                                                                                     real_photos):
    """Drop a photo whose answer is slow, then another: the first request is aborted, and its answer can never land
    under the second photo's preview. The first fetch is held in the page until the second is answered."""
    page.goto(service_url + "/")
    page.locator("#served").filter(has_text="Serving").wait_for()
    page.evaluate("""() => {
        const realFetch = window.fetch;
        window.firstRequest = null;
        window.fetch = (url, options) => {
            if (window.firstRequest !== null) return realFetch(url, options);
            // Held: settles only if the page aborts it, as a real fetch does (AbortError).
            return new Promise((resolve, reject) => {
                window.firstRequest = { signal: options.signal, aborted: false };
                if (options.signal) options.signal.addEventListener("abort", () => {
                    window.firstRequest.aborted = true;
                    reject(new DOMException("The user aborted a request.", "AbortError"));
                });
            });
        };
    }""")
    first, second = real_photos[0], real_photos[2]
    assert drop_file(page, first.name, first.read_bytes(), "image/jpeg")
    page.get_by_role("status").filter(has_text=f"Classifying {first.name}").wait_for()
    assert drop_file(page, second.name, second.read_bytes(), "image/png")
    assert shown_labels(page, second.name) == api_top5(service_url, second.read_bytes(), "image/png")
    assert page.evaluate("window.firstRequest.aborted") is True
    assert page.is_hidden("#error")  # the abort is not "Could not reach the service"
    assert page.inner_text("#status") == f"Classified {second.name}."


def test_page_classifies_with_a_model_of_fewer_than_5_classes(page, tmp_path, launch, real_photos):
    from export.onnx import export_onnx_version

    export_onnx_version(tmp_path, "three", "convnext_atto", num_classes=3, input_size=32)
    picked = real_photos[2]
    with launch(tmp_path) as url:
        page.goto(url + "/")
        page.set_input_files("#file-input", str(picked))
        assert len(shown_labels(page, picked.name)) == 3  # every class; it asked for top_k=5 and got a 422 before
        assert page.is_hidden("#error")


@pytest.fixture(scope="module")
def demo_repository(tmp_path_factory):
    """The demo's shape: a project checkpoint of a run without --data-dir (digits "0".."9"), exported."""
    import dataclasses

    import torch

    from export.onnx import export_onnx_version
    from model import create_model, get_config

    folder = tmp_path_factory.mktemp("demo")
    data_config = dataclasses.asdict(get_config("convnext_atto").data) | {"input_size": 32, "crop_pct": 1.0}
    torch.save({"model": create_model("convnext_atto", num_classes=10).state_dict(), "model_name": "convnext_atto",
                "model_kwargs": {"num_classes": 10}, "data_config": data_config,
                "class_names": [str(i) for i in range(10)], "config": {"preset": "demo", "data_dir": ""}},
               folder / "checkpoint_best.pth")
    export_onnx_version(folder / "models", "digits", checkpoint=folder / "checkpoint_best.pth")
    return folder / "models"


def test_the_demo_page_says_it_knows_digits_and_how_to_serve_imagenet_convnext_t(page, demo_repository, launch):
    with launch(demo_repository) as url:
        page.goto(url + "/")
        about = page.locator("#about")
        about.filter(has_text="handwritten digits").wait_for(timeout=15_000)
        assert "recognises 10 classes (0, 1, 2, 3, 4, …)" in about.inner_text()
        assert page.is_visible("#imagenet-hint")
        assert page.inner_text("#imagenet-command") == "convnext serve --pretrained convnext_tiny_1k_224_ema"
        page.screenshot(path="/tmp/web_page_demo.png", full_page=True)


def test_page_shows_the_services_error_message_for_a_text_file(page, service_url, tmp_path):
    page.goto(service_url + "/")
    text_file = tmp_path / "notes.txt"
    text_file.write_text("this is not an image\n")
    expected = httpx.post(f"{service_url}/classify?top_k=5", content=text_file.read_bytes(),
                          headers={"Content-Type": "text/plain"}).json()["error"]["message"]

    page.set_input_files("#file-input", str(text_file))
    alert = page.get_by_role("alert")
    alert.wait_for(timeout=15_000)
    assert expected in alert.inner_text()
    assert "notes.txt" in alert.inner_text()
    assert page.is_hidden("#output")


def test_page_asks_for_the_api_key_after_a_401_and_then_classifies(page, model_repository, launch, real_photos):
    picked = real_photos[2]
    with launch(model_repository, api_key="page-secret") as url:
        page.goto(url + "/")
        page.set_input_files("#file-input", str(picked))
        page.get_by_role("alert").wait_for(timeout=15_000)
        assert "no API key" in page.inner_text("#error")  # the service's own 401 message
        key_field = page.get_by_label("API key")
        key_field.wait_for(timeout=5_000)
        key_field.fill("page-secret")
        key_field.press("Enter")
        expected = httpx.post(f"{url}/classify?top_k=5", content=picked.read_bytes(),
                              headers={"Content-Type": "image/png", "X-API-Key": "page-secret"})
        labels = [p["label"] for p in expected.json()["results"][0]["top_k"]]
        assert shown_labels(page, picked.name) == labels
        assert page.is_hidden("#key-form") and page.is_hidden("#error")


def test_page_says_when_the_model_list_cannot_be_read(page, model_repository, launch, monkeypatch):
    """A 503 from /models is shown as what it is, not as "No model is being served yet"."""
    from service import routes

    def unreadable(state):
        raise PermissionError(13, "Permission denied", str(model_repository))

    monkeypatch.setattr(routes, "repository_listing", unreadable)
    with launch(model_repository, warmup_runs=0) as url:
        page.goto(url + "/")
        served = page.locator("#served")
        served.filter(has_text="Could not read /models").wait_for(timeout=15_000)
        assert "cannot read the model repository (PermissionError, logged)" in served.inner_text()
