"""The web page in a real headless Chromium against the running service (tiny weights): the whole flow by keyboard,
the two-stage flow (preview, edit the caption, restore), several samples side by side, the output format, the model
(SUPIR variant) choice, a folder as one batch (its progress, cancel and zip), no horizontal scrolling on a phone or a
desktop, an axe-core scan, errors as sentences, and the screenshots in docs/."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import zipfile
from pathlib import Path

import httpx
import pytest
import redis
from PIL import Image
from playwright.sync_api import Page, expect

from api.limits import FORM_OVERHEAD_BYTES
from tests.paths import DATA, DOCS
from tests.servers import Service, running, wait_until

PHOTO = DATA / "chelsea_degraded.jpg"
PORTRAIT = DATA / "astronaut_small.jpg"  # one face about 36 px across
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}
JOB_DONE = 180_000  # ms: a slow CPU, a shared worker
PNG = b"\x89PNG\r\n\x1a\n"
JPEG = b"\xff\xd8\xff"

# every text the live regions announce and every value the progress bars take, in order (test instrumentation only)
RECORDER = """
window.__statuses = []; window.__bar = []; window.__batch = []; window.__batchBar = [];
document.addEventListener('DOMContentLoaded', () => {
  const record = (id, texts, values) => {
    const status = document.getElementById(id + 'status'), bar = document.getElementById(id + 'bar');
    new MutationObserver(() => texts.push(status.textContent))
      .observe(status, {childList: true, characterData: true, subtree: true});
    new MutationObserver(() => bar.hasAttribute('value') && values.push(Number(bar.getAttribute('value'))))
      .observe(bar, {attributes: true, attributeFilter: ['value']});
  };
  record('', window.__statuses, window.__bar);
  record('batch-', window.__batch, window.__batchBar);
});
"""


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        yield browser
        browser.close()


def open_page(browser, service: Service, viewport: dict[str, int]) -> Page:  # type: ignore[no-untyped-def]
    """The page with alice's key already saved, as the page keeps it in localStorage after it was typed once."""
    context = browser.new_context(viewport=viewport, accept_downloads=True)
    key = json.dumps(service.keys["alice"])
    context.add_init_script(f"localStorage.setItem('supir-key', {key});")
    context.add_init_script(RECORDER)
    page = context.new_page()
    page.goto(f"{service.url}/")
    expect(page.locator("#p-min_size")).to_be_visible(timeout=30_000)  # the form, built from /openapi.json
    return page


def no_horizontal_overflow(page: Page) -> None:
    widths = page.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
    assert widths[0] <= widths[1], widths


def tab_to(page: Page, selector: str, limit: int = 80) -> None:
    """Press Tab until the element is focused (keyboard only)."""
    for _ in range(limit):
        if page.evaluate("s => document.activeElement && document.activeElement.matches(s)", selector):
            return
        page.keyboard.press("Tab")
    raise AssertionError(f"Tab never reached {selector}")


def serious_violations(page: Page) -> list[str]:
    from axe_playwright_python.sync_playwright import Axe

    results = Axe().run(page)
    return [
        f"{v['id']} ({v['impact']}): {[n['target'] for n in v['nodes']]}"
        for v in results.response["violations"]
        if v["impact"] in ("serious", "critical")
    ]


def api(service: Service) -> httpx.Client:
    return httpx.Client(base_url=service.url, headers={"Authorization": f"Bearer {service.keys['alice']}"}, timeout=30)


def test_the_form_is_generated_from_the_schema_and_passes_axe(browser, service: Service) -> None:
    page = open_page(browser, service, DESKTOP)
    schema = httpx.get(f"{service.url}/openapi.json").json()["components"]["schemas"]["RestoreParams"]["properties"]
    for name, s in schema.items():  # every parameter a labelled control, with the schema's range
        field = page.locator(f"#p-{name}")
        expect(field).to_have_count(1)
        assert page.locator(f'label[for="p-{name}"]').count() == 1, name
        if "maximum" in s:
            assert field.get_attribute("max") == str(s["maximum"]).removesuffix(".0"), name
    assert "slow on a CPU" in page.inner_text("#p-min_size-hint")
    # a preset fills the fields with the values the API says it sets, and the defaults come back without one
    presets = httpx.get(f"{service.url}/openapi.json").json()["components"]["schemas"]["RestoreParams"]["x-presets"]
    page.select_option("#preset", "lightning")
    for name, value in presets["lightning"].items():
        assert page.input_value(f"#p-{name}") == str(value).removesuffix(".0"), name
    page.select_option("#preset", "")
    assert page.input_value("#p-steps") == "" and page.input_value("#p-sampler") == schema["sampler"]["default"]
    # the new result-file fields: a select for the format, a checkbox for the metadata, the quality only for JPEG/WebP
    assert page.locator("#p-output_format").evaluate("el => el.tagName") == "SELECT"
    assert page.locator("#p-keep_metadata").get_attribute("type") == "checkbox"
    expect(page.locator("#p-keep_metadata")).to_be_checked()
    expect(page.locator("#p-output_quality")).to_be_disabled()
    page.select_option("#p-output_format", "webp")
    expect(page.locator("#p-output_quality")).to_be_enabled()
    page.select_option("#preset", "lightning")  # a preset puts the format back to the default: PNG
    assert page.input_value("#p-output_format") == "png"
    expect(page.locator("#p-output_quality")).to_be_disabled()
    page.select_option("#preset", "")
    # the service runs one SUPIR variant: no model to choose
    variants = httpx.get(f"{service.url}/v1/service").json()["variants"]
    assert len(variants) == 1 and variants[0]["default"], variants
    expect(page.locator("#variant-box")).to_be_hidden()
    page.keyboard.press("Tab")  # focus is visible
    assert page.evaluate("getComputedStyle(document.activeElement).outlineStyle") != "none"
    no_horizontal_overflow(page)
    assert serious_violations(page) == []
    assert httpx.get(f"{service.url}/favicon.ico").status_code == 200
    page.context.close()


def test_an_invalid_file_is_a_sentence_with_the_field_highlighted(browser, service: Service, tmp_path: Path) -> None:
    page = open_page(browser, service, PHONE)
    bad = tmp_path / "notes.png"
    bad.write_text("this is not a picture")
    page.set_input_files("#file", str(bad))
    page.click("#submit")
    expect(page.locator("#error")).to_contain_text("Not a PNG, JPEG", timeout=30_000)
    error = page.inner_text("#error")
    assert "[" not in error and "unsupported_media_type" not in error and error.rstrip().endswith(".")
    expect(page.locator("#file")).to_have_attribute("aria-invalid", "true")
    page.fill("#p-steps", "999")  # out of range, sent as it is: the API names the field
    page.set_input_files("#file", str(PHOTO))  # the next action clears the last error
    expect(page.locator("#error")).to_be_empty()
    expect(page.locator("#file")).not_to_have_attribute("aria-invalid", "true")
    page.click("#submit")
    expect(page.locator("#p-steps")).to_have_attribute("aria-invalid", "true", timeout=30_000)
    assert "Steps" in page.inner_text("#error")
    page.context.close()


def test_the_whole_flow_by_keyboard(browser, service: Service, tmp_path: Path) -> None:
    page = open_page(browser, service, DESKTOP)
    thumbnails: list[str] = []
    page.on("request", lambda r: thumbnails.append(r.url) if "/thumbnail" in r.url else None)
    tab_to(page, "#file")
    page.set_input_files("#file", str(PHOTO))  # the OS file dialog cannot be driven; all else is keys
    for field, value in (("#p-min_size", "64"), ("#p-steps", "3"), ("#p-seed", "5")):
        tab_to(page, field)
        page.keyboard.type(value)
    tab_to(page, "#submit")
    page.keyboard.press("Enter")
    expect(page.locator("#result")).to_be_visible(timeout=JOB_DONE)
    expect(page.locator("#after")).to_have_js_property("complete", True)
    assert page.eval_on_selector("#after", "img => img.naturalWidth") == 150
    statuses = page.evaluate("window.__statuses")
    assert any("sampling step" in s and "%" in s for s in statuses), statuses  # announced in the live region
    assert page.get_attribute("#status", "aria-live") == "polite"
    assert statuses[-1] == "Restoration done."
    bar = page.evaluate("window.__bar")
    assert bar == sorted(bar) and bar[-1] == 100 and len(set(bar)) >= 4, bar  # stage by stage, never backwards
    job_id = page.inner_text("#job-id")
    no_horizontal_overflow(page)

    for width in (360, 799, 801, 1440):  # one column below 800 px, never a horizontal scroll bar
        page.set_viewport_size({"width": width, "height": 900})
        no_horizontal_overflow(page)
        columns = page.evaluate(
            "getComputedStyle(document.querySelector('.grid')).gridTemplateColumns.split(' ').length"
        )
        assert columns == (1 if width < 800 else 2), (width, columns)
    page.set_viewport_size(DESKTOP)

    tab_to(page, "#slider")  # compare before/after
    for _ in range(3):
        page.keyboard.press("ArrowLeft")
    clip = page.eval_on_selector("#compare .after", "el => el.style.clipPath")
    assert re.search(r"inset\(0(px)? 0(px)? 0(px)? (4[0-9])%\)", clip), clip
    tab_to(page, "#download")
    with page.expect_download() as download:
        page.keyboard.press("Enter")
    saved = tmp_path / download.value.suggested_filename
    download.value.save_as(saved)
    assert saved.name == f"{job_id}.png" and saved.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    details = page.inner_text("#details")
    assert "seed" in details and "sampling (s)" in details
    assert "sampling untiled" in details and "tiling, why" in details  # how it ran, and why
    expect(page.locator("#faces-note")).to_be_hidden()  # faces off: nothing said of them
    expect(page.locator("#face-boxes")).to_be_hidden()

    assert serious_violations(page) == []

    # another job made elsewhere shows up in the history and follows its status; opened by keyboard
    with api(service) as client:
        params = {"min_size": 64, "steps": 2, "seed": 9}
        made = client.post("/v1/jobs", files={"image": PHOTO.read_bytes()}, data={"params": json.dumps(params)})
        assert made.status_code == 202, made.text
        other = made.json()["id"]
    entry = page.locator(f'#jobs button[data-id="{other}"]')
    expect(entry).to_have_attribute("data-status", "succeeded", timeout=JOB_DONE)
    expect(entry.locator("img")).to_have_attribute("src", re.compile("^blob:"), timeout=30_000)
    assert any(f"/v1/jobs/{other}/thumbnail" in url for url in thumbnails)
    tab_to(page, f'#jobs button[data-id="{other}"]')
    page.keyboard.press("Enter")
    expect(page.locator("#job-id")).to_have_text(other, timeout=30_000)
    expect(page.locator("#no-before")).to_be_visible()  # the service keeps no upload: only the result
    tab_to(page, f'#jobs button[data-id="{job_id}"]')
    page.keyboard.press(" ")
    expect(page.locator("#job-id")).to_have_text(job_id, timeout=30_000)
    expect(page.locator("#compare-box")).to_be_visible()
    no_horizontal_overflow(page)
    page.context.close()


def test_preview_edit_the_caption_then_restore_on_a_phone(browser, service: Service) -> None:
    page = open_page(browser, service, PHONE)
    no_horizontal_overflow(page)
    assert serious_violations(page) == []
    page.set_input_files("#file", str(PHOTO))
    page.fill("#p-min_size", "64")
    page.fill("#p-steps", "3")
    page.click("#preview")
    caption = page.locator("#caption-edit")
    expect(caption).to_be_visible(timeout=JOB_DONE)
    expect(caption).to_be_editable()
    expect(page.locator("#stage1")).to_have_js_property("complete", True)
    assert page.eval_on_selector("#stage1", "img => img.naturalWidth") > 0
    preview_id = page.locator("#restore-caption").get_attribute("data-job")
    caption.fill("my grandmother's cat on a rug")
    page.click("#restore-caption")
    expect(page.locator("#result")).to_be_visible(timeout=JOB_DONE)
    job_id = page.inner_text("#job-id")
    assert job_id != preview_id
    with api(service) as client:
        job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["stage1_job"] == preview_id and "stage1" not in job["seconds"]
    assert job["params"]["prompt"] == "my grandmother's cat on a rug" and job["params"]["caption"] == "none"
    expect(page.locator("#compare-box")).to_be_visible()
    no_horizontal_overflow(page)
    assert serious_violations(page) == []
    page.screenshot(path=str(DOCS / "ui-phone.png"), full_page=True)
    page.click(f'#jobs button[data-id="{preview_id}"]')  # a preview reopened from the history: its stage 1 again
    expect(page.locator("#preview-panel")).to_be_visible(timeout=30_000)
    expect(page.locator("#result")).to_be_hidden()
    assert page.locator("#restore-caption").get_attribute("data-job") == preview_id
    page.context.close()


def test_three_samples_side_by_side_each_downloadable_and_comparable(browser, service: Service, tmp_path: Path) -> None:
    page = open_page(browser, service, DESKTOP)
    page.set_input_files("#file", str(PHOTO))
    for field, value in (("#p-min_size", "64"), ("#p-steps", "2"), ("#p-seed", "7301"), ("#p-num_samples", "3")):
        page.fill(field, value)
    page.click("#submit")
    cards = page.locator("#samples li")
    expect(cards).to_have_count(3, timeout=JOB_DONE)
    expect(page.locator("#result")).to_be_visible()
    job_id = page.inner_text("#job-id")
    for i in range(3):
        expect(cards.nth(i).locator("img")).to_have_js_property("complete", True)
    assert [cards.nth(i).get_attribute("data-seed") for i in range(3)] == ["7301", "7302", "7303"]
    boxes = [cards.nth(i).bounding_box() for i in range(3)]
    assert len({round(b["y"]) for b in boxes}) == 1 and boxes[0]["x"] < boxes[1]["x"] < boxes[2]["x"], boxes
    expect(page.locator("#download")).to_be_hidden()  # each sample has its own link instead
    with api(service) as client:
        job = client.get(f"/v1/jobs/{job_id}").json()
    assert [r["seed"] for r in job["results"]] == [7301, 7302, 7303] and job["result"] == job["results"][0]
    assert not job["cached"]

    files = []
    for i in range(3):  # every sample downloads as its own picture
        with page.expect_download() as download:
            cards.nth(i).get_by_role("link").click()
        saved = tmp_path / download.value.suggested_filename
        download.value.save_as(saved)
        assert saved.name == f"{job_id}-{i + 1}.png" and saved.read_bytes()[:8] == PNG, saved.name
        with Image.open(saved) as image:
            assert image.size == (job["results"][i]["width"], job["results"][i]["height"])
        files.append(saved.read_bytes())
    assert len(set(files)) == 3  # three seeds, three different pictures

    # the slider compares the first; the second is chosen by keyboard
    buttons = [cards.nth(i).locator("button") for i in range(3)]
    expect(buttons[0]).to_have_attribute("aria-pressed", "true")
    tab_to(page, '#samples li[data-index="1"] button')
    page.keyboard.press("Enter")
    expect(buttons[1]).to_have_attribute("aria-pressed", "true")
    expect(buttons[0]).to_have_attribute("aria-pressed", "false")
    assert page.get_attribute("#after", "src") == cards.nth(1).locator("img").get_attribute("src")
    assert "sample 2 of 3, seed 7302" in page.get_attribute("#after", "alt")
    expect(page.locator("#compare-box")).to_be_visible()
    assert "7301, 7302, 7303" in page.inner_text("#details")

    no_horizontal_overflow(page)
    assert serious_violations(page) == []
    page.screenshot(path=str(DOCS / "ui.png"), full_page=True)
    page.set_viewport_size(PHONE)  # one column on a phone
    boxes = [cards.nth(i).bounding_box() for i in range(3)]
    assert len({round(b["x"]) for b in boxes}) == 1 and boxes[0]["y"] < boxes[1]["y"] < boxes[2]["y"], boxes
    no_horizontal_overflow(page)
    assert serious_violations(page) == []
    page.set_viewport_size({"width": 360, "height": 800})
    no_horizontal_overflow(page)
    page.context.close()


def test_the_same_request_again_is_answered_from_the_cache_and_says_so(
    browser, fixture_a: Path, tmp_path: Path
) -> None:
    """A service of its own: the shared one runs with the result cache off (its tests repeat requests)."""
    with running(tmp_path, fixture_a, {"alice": {}}, result_cache="owner") as cached:
        page = open_page(browser, cached, DESKTOP)
        page.set_input_files("#file", str(PHOTO))
        for field, value in (("#p-min_size", "64"), ("#p-steps", "2"), ("#p-seed", "7411")):  # a seed: reproducible
            page.fill(field, value)
        page.click("#submit")
        expect(page.locator("#result")).to_be_visible(timeout=JOB_DONE)
        first = page.inner_text("#job-id")
        expect(page.locator("#cached")).to_be_hidden()
        # the worker files the result under its cache key just after the job ends: the second request waits for it
        store = redis.Redis.from_url(cached.env["SUPIR_REDIS_URL"])
        wait_until(lambda: next(store.scan_iter(f"{cached.prefix}:cache:*"), None), 30, what="the cache entry")
        page.click("#submit")  # the same photo, parameters and seed
        expect(page.locator("#job-id")).not_to_have_text(first, timeout=JOB_DONE)
        expect(page.locator("#cached")).to_be_visible(timeout=30_000)
        expect(page.locator("#status")).to_have_text("Restoration done, from the cache.")
        assert first in page.inner_text("#details")  # the job whose result it is
        expect(page.locator("#compare-box")).to_be_visible()
        assert serious_violations(page) == []
        page.context.close()


def test_jpeg_output_downloads_a_jpg(browser, service: Service, tmp_path: Path) -> None:
    page = open_page(browser, service, PHONE)
    page.set_input_files("#file", str(PHOTO))
    page.fill("#p-min_size", "64")
    page.fill("#p-steps", "2")
    page.select_option("#p-output_format", "jpeg")
    page.click("#advanced summary")
    page.fill("#p-output_quality", "80")
    page.click("#submit")
    expect(page.locator("#result")).to_be_visible(timeout=JOB_DONE)
    expect(page.locator("#samples")).to_be_hidden()  # one result looks as it always has
    job_id = page.inner_text("#job-id")
    with page.expect_download() as download:
        page.click("#download")
    saved = tmp_path / download.value.suggested_filename
    download.value.save_as(saved)
    assert saved.name == f"{job_id}.jpg" and saved.read_bytes()[:3] == JPEG
    with api(service) as client:
        job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["params"]["output_format"] == "jpeg" and job["params"]["output_quality"] == 80
    assert job["result"]["content_type"] == "image/jpeg"
    assert "JPEG, quality 80" in page.inner_text("#details")
    page.context.close()


def test_the_model_choice_where_the_service_runs_two_variants(browser, fixture_a: Path, tmp_path: Path) -> None:
    """The API alone (no worker: the job stays queued) with two variants: the page offers them, the default first."""
    checkpoint = str(fixture_a / "supir.ckpt")
    variants = json.dumps({"v0Q": checkpoint, "v0F": checkpoint})
    with running(tmp_path, fixture_a, {"alice": {}}, with_workers=False, variants=variants) as two:
        page = open_page(browser, two, PHONE)
        expect(page.locator("#variant")).to_be_visible()
        assert page.input_value("#variant") == "v0Q"
        assert page.locator("#variant option").all_inner_texts() == [
            "v0Q · quality, for heavy degradation",
            "v0F · fidelity, for light degradation",
        ]
        assert page.locator('label[for="variant"]').inner_text() == "Model"
        page.select_option("#variant", "v0F")
        expect(page.locator("#variant-hint")).to_contain_text("v0F: 0 workers, 0 queued")
        no_horizontal_overflow(page)
        assert serious_violations(page) == []
        page.set_input_files("#file", str(PHOTO))
        page.fill("#p-min_size", "64")
        page.click("#submit")
        expect(page.locator("#status")).to_contain_text("queued", timeout=30_000)
        with two.client("alice") as client:
            jobs = client.get("/v1/jobs").json()["jobs"]
            assert len(jobs) == 1, jobs
            assert client.get(f"/v1/jobs/{jobs[0]['id']}").json()["variant"] == "v0F"
        page.context.close()


def test_progress_is_weighted_by_stage_and_never_goes_backwards(browser, service: Service) -> None:
    page = open_page(browser, service, PHONE)
    seen = page.evaluate("""() => [
        ['queued', 0, 0], ['stage1', 0, 0], ['caption', 1, 2], ['caption', 2, 2], ['conditioning', 0, 0],
        ['sampling', 0, 10], ['sampling', 5, 10], ['stage1', 0, 0], ['decoding', 0, 0],
      ].map(([stage, step, steps]) => percent({id: 'job_x', kind: 'restore', status: 'running',
                                               progress: {stage, step, steps}}))""")
    assert seen == [0, 0, 15, 20, 20, 20, 55, 55, 90], seen
    assert page.evaluate("percent({id: 'job_x', kind: 'restore', status: 'succeeded', progress: {}})") == 100
    # with faces=auto every face is a restoration of its own: the face pass has a share of the bar
    seen = page.evaluate("""() => [['sampling', 10, 10], ['decoding', 0, 0], ['faces', 0, 2], ['faces', 1, 2],
                                   ['faces', 2, 2]]
      .map(([stage, step, steps]) => percent({id: 'job_f', kind: 'restore', status: 'running',
                                               params: {faces: 'auto'}, progress: {stage, step, steps}}))""")
    assert seen == [50, 50, 55, 75, 95], seen
    said = page.evaluate("""statusText({id: 'job_g', kind: 'restore', status: 'running', params: {faces: 'auto'},
                                        progress: {stage: 'faces', step: 1, steps: 2}})""")
    assert said == "Restoration running: restoring faces, step 1 of 2, 75% done.", said
    # a batch: its ended jobs of all, those that did not succeed named; its ETA as a time of day and a duration
    counts = {"queued": 26, "running": 2, "succeeded": 11, "failed": 1, "canceled": 0, "deleted": 0}
    said = page.evaluate("c => batchWords({total: 40, counts: c})", counts)
    assert said == "12 of 40 done, 1 failed", said
    eta = page.evaluate("batchEta({status: 'running', eta: new Date(Date.now() + 185000).toISOString()})")
    assert re.fullmatch(r"Expected to end around \d{1,2}:\d\d:\d\d( [AP]M)? \(in about 3 min\)\.", eta), eta
    assert page.evaluate("batchEta({status: 'running', eta: null})") == ""
    page.context.close()


def test_faces_are_sent_then_outlined_on_the_before_image_and_listed(browser, service: Service) -> None:
    page = open_page(browser, service, DESKTOP)
    expect(page.locator("#p-faces")).to_be_visible()  # among the first fields, not under the advanced ones
    assert page.locator('#p-faces option[value="auto"]').inner_text() == "restore faces again (slower)"
    assert "one more restoration per face" in page.inner_text("#p-faces-hint")
    page.set_input_files("#file", str(PORTRAIT))
    for field, value in (("#p-min_size", "256"), ("#p-steps", "2"), ("#p-seed", "3")):
        page.fill(field, value)
    page.select_option("#p-faces", "auto")
    page.click("#advanced summary")
    page.fill("#p-face_size", "256")
    page.click("#submit")
    expect(page.locator("#result")).to_be_visible(timeout=JOB_DONE)
    expect(page.locator("#before")).to_have_js_property("complete", True)
    with api(service) as client:
        job = client.get(f"/v1/jobs/{page.inner_text('#job-id')}").json()
    assert job["params"]["faces"] == "auto"  # sent in the form's params: the default is off
    found = job["faces"]["faces"]
    assert len(found) == 1, found  # the astronaut's
    outlines = page.locator("#face-boxes rect")
    expect(outlines).to_have_count(1)
    before = page.locator("#before").bounding_box()
    scale = before["width"] / job["input"]["width"]  # the box is in the input's pixels, drawn at the shown size
    drawn = outlines.first.bounding_box()
    x0, y0, x1, y1 = found[0]["box"]
    expected = (before["x"] + x0 * scale, before["y"] + y0 * scale, (x1 - x0) * scale, (y1 - y0) * scale)
    shown = (drawn["x"], drawn["y"], drawn["width"], drawn["height"])
    assert all(abs(a - b) <= 3 for a, b in zip(shown, expected, strict=True)), (shown, expected)
    assert page.get_attribute("#face-boxes", "aria-hidden") == "true"  # the words below say it
    expect(page.locator("#faces-summary")).to_contain_text("1 face restored again, outlined on the before image")
    expect(page.locator("#faces-list li")).to_have_text(
        [re.compile(rf"^Face 1: {x1 - x0} × {y1 - y0} px at {x0}, {y0}")]
    )
    details = page.inner_text("#details")
    assert "face 1" in details and "faces (s)" in details and "tiling, why" in details
    no_horizontal_overflow(page)
    assert serious_violations(page) == []
    page.context.close()


def test_eta_then_cancel_says_canceling_at_once(browser, service: Service) -> None:
    page = open_page(browser, service, DESKTOP)
    page.set_input_files("#file", str(PHOTO))
    page.fill("#p-min_size", "64")
    page.fill("#p-steps", "200")
    page.click("#submit")
    expect(page.locator("#eta")).to_contain_text("s of sampling left", timeout=JOB_DONE)  # from the steps seen
    cancel = page.locator("#cancel")
    expect(cancel).to_be_visible()
    cancel.click()
    assert page.inner_text("#status") == "Canceling…"  # at once, before the service answers
    expect(page.locator("#status")).to_have_text("Restoration canceled.", timeout=JOB_DONE)
    expect(cancel).to_be_hidden()
    page.context.close()


def test_api_docs_render_offline(browser, service: Service, tmp_path: Path) -> None:
    """/docs (Swagger UI) and /redoc render with every request refused that leaves the service (no CDN)."""
    outside: list[str] = []
    page = browser.new_page(viewport={"width": 1200, "height": 900})

    def only_the_service(route) -> None:  # type: ignore[no-untyped-def]
        if route.request.url.startswith(service.url):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    page.route("**/*", only_the_service)
    page.goto(f"{service.url}/docs")
    page.wait_for_selector(".swagger-ui .opblock", timeout=60_000)
    assert page.locator(".swagger-ui .opblock").count() >= 5
    shot = Path(os.environ.get("SUPIR_DOCS_SCREENSHOT", tmp_path / "docs.png"))  # docs/api-docs.png
    page.screenshot(path=str(shot), full_page=False)
    assert outside == []
    page.goto(f"{service.url}/redoc")
    page.wait_for_selector("text=supir-serve", timeout=60_000)
    page.close()
    # ReDoc's bundle asks for its vendor's logo (its "API docs by" footer); refused, nothing else is missing
    assert all(url.endswith("/logo-mini.svg") for url in outside), outside
    assert shot.stat().st_size > 10_000


def write_photos(folder: Path, sizes: list[tuple[int, int]], noise: bool = False) -> list[Path]:
    """Small real photos, each different: PNG and JPEG in turn (noise: large for their size, as PNG barely packs it)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, size in enumerate(sizes):
        path = folder / f"photo-{i + 1}.{'jpg' if i % 2 else 'png'}"
        if noise:
            image = Image.frombytes("RGB", size, random.Random(i).randbytes(size[0] * size[1] * 3))
        else:
            ramp = Image.linear_gradient("L").resize(size)
            image = Image.merge(
                "RGB", [ramp, ramp.transpose(Image.Transpose.FLIP_TOP_BOTTOM), Image.new("L", size, 70 * i)]
            )
        image.save(path)
        paths.append(path)
    return paths


def test_a_folder_is_one_batch_followed_to_the_end_and_its_results_saved_as_a_zip(
    browser, service: Service, tmp_path: Path
) -> None:
    folder = tmp_path / "holiday"
    photos = write_photos(folder, [(64, 48), (72, 56), (56, 64)])
    (folder / "notes.txt").write_text("scanned in March")
    (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + bytes(64))  # macOS leaves one in every folder
    page = open_page(browser, service, DESKTOP)
    sent: list[str] = []
    page.on("request", lambda r: sent.append(f"{r.method} {r.url.split('?')[0]} {r.headers.get('content-type', '')}"))
    for field, value in (("#p-min_size", "64"), ("#p-steps", "2"), ("#p-seed", "11")):
        tab_to(page, field)
        page.keyboard.type(value)
    page.set_input_files("#folder", str(folder))  # the OS folder dialog cannot be driven; all else is keys
    chosen = page.locator("#filename")
    expect(chosen).to_contain_text("Chosen: 3 photos, restored as one batch")
    expect(chosen).to_contain_text("2 files skipped, not a photo the service reads")
    assert ".DS_Store" in chosen.inner_text() and "notes.txt" in chosen.inner_text()
    expect(page.locator("#submit")).to_have_text("Restore 3 photos")
    expect(page.locator("#preview")).to_be_hidden()  # a preview is of one photo
    tab_to(page, "#submit")
    page.keyboard.press("Enter")

    expect(page.locator("#batch-id")).to_contain_text("bat_", timeout=60_000)
    batch_id = page.inner_text("#batch-id").removeprefix(" · ")
    assert serious_violations(page) == []  # while it runs
    status = page.locator("#batch-status")
    expect(status).to_have_text("Batch ended: 3 of 3 done.", timeout=3 * JOB_DONE)
    said = page.evaluate("window.__batch")
    assert said[0] == "Sending 3 photos…" and "Uploading the photos: 3 of 3 sent." in said, said
    assert any(re.fullmatch(r"[0-2] of 3 done\.", s) for s in said), said  # announced as it went
    bar = page.evaluate("window.__batchBar")
    assert bar == sorted(bar) and bar[-1] == 100, bar  # never backwards
    assert page.get_attribute("#batch-bar", "aria-valuetext") == "100%: 3 of 3 done"
    assert page.get_attribute("#batch-status", "aria-live") == "polite"
    expect(page.locator("#batch-cancel")).to_be_hidden()
    # direct uploads: three signed PUTs, then one JSON create naming them
    puts = [s for s in sent if s.startswith("PUT ") and "/v1/uploads/upl_" in s]
    creates = [s for s in sent if s.startswith("POST ") and s.split()[1].endswith("/v1/batches")]
    assert len(puts) == 3 and len(creates) == 1 and creates[0].endswith("application/json"), sent

    with api(service) as client:
        view = client.get(f"/v1/batches/{batch_id}").json()
        jobs = [client.get(f"/v1/jobs/{job_id}").json() for job_id in view["job_ids"]]
    assert view["status"] == "ended" and view["counts"]["succeeded"] == 3, view
    for job, path in zip(jobs, photos, strict=True):  # in the folder's order, with the form's parameters
        with Image.open(path) as image:
            assert (job["input"]["width"], job["input"]["height"]) == image.size, job["input"]
        assert (job["params"]["min_size"], job["params"]["steps"], job["params"]["seed"]) == (64, 2, 11)

    tab_to(page, "#batch-zip")
    expect(page.locator("#batch-zip")).to_have_text("Download all (zip)")
    with page.expect_download(timeout=60_000) as download:
        page.keyboard.press("Enter")
    saved = tmp_path / download.value.suggested_filename
    download.value.save_as(saved)
    assert saved.name == f"{batch_id}.zip"
    with zipfile.ZipFile(saved) as archive:
        names = archive.namelist()
        results = [n for n in names if n != "manifest.json"]
        assert results == [f"{i:04d}-{job['id']}.png" for i, job in enumerate(jobs)], names
        for name, job in zip(results, jobs, strict=True):
            data = archive.read(name)
            assert data[:8] == PNG
            with Image.open(archive.open(name)) as image:
                assert image.size == (job["result"]["width"], job["result"]["height"])
        manifest = json.loads(archive.read("manifest.json"))
    assert [j["status"] for j in manifest["jobs"]] == ["succeeded"] * 3, manifest

    no_horizontal_overflow(page)
    assert serious_violations(page) == []  # ended, with its zip button
    page.set_viewport_size(PHONE)
    no_horizontal_overflow(page)
    assert serious_violations(page) == []
    page.context.close()


def test_without_direct_uploads_a_batch_is_one_request_its_limit_and_item_errors_said_then_canceled(
    browser, fixture_a: Path, tmp_path: Path
) -> None:
    """The API alone (no worker: the batch's jobs stay queued, so a cancel ends them all at once), with a small
    multipart batch limit, and a page that finds no /v1/uploads in the service's API document."""
    settings = {"max_batch_upload_bytes": 100_000, "max_upload_bytes": 500_000}
    with running(tmp_path, fixture_a, {"alice": {}}, with_workers=False, **settings) as alone:
        page = open_page(browser, alone, PHONE)
        page.fill("#p-min_size", "64")
        big = write_photos(tmp_path / "big", [(620, 620), (64, 48)], noise=True)
        assert big[0].stat().st_size > 500_000 and sum(p.stat().st_size for p in big) > 100_000 + FORM_OVERHEAD_BYTES

        # direct uploads: a photo over the service's limit is refused before its bytes are sent, and named
        page.set_input_files("#file", [str(p) for p in big])
        page.click("#submit")
        error = page.locator("#error")
        expect(error).to_contain_text("Photo “photo-1.png” (items[0]): Size 1,", timeout=30_000)
        expect(error).to_contain_text("at most 500,000 bytes are accepted (SUPIR_MAX_UPLOAD_BYTES)")
        expect(page.locator("#file")).to_have_attribute("aria-invalid", "true")
        expect(page.locator("#batch-status")).to_have_text("Not accepted: nothing was queued.")

        # a service without direct uploads: what follows goes as one multipart request
        def without_uploads(route) -> None:  # type: ignore[no-untyped-def]
            response = route.fetch()
            spec = response.json()
            del spec["paths"]["/v1/uploads"]
            route.fulfill(response=response, json=spec)

        page.route("**/openapi.json", without_uploads)
        page.reload()
        expect(page.locator("#p-min_size")).to_be_visible(timeout=30_000)
        sent: list[str] = []
        page.on(
            "request", lambda r: sent.append(f"{r.method} {r.url.split('?')[0]} {r.headers.get('content-type', '')}")
        )
        page.fill("#p-min_size", "64")
        page.fill("#p-steps", "2")

        # several files dropped at once (with a note among them): a batch of the photos
        dropped = page.evaluate("""() => {
            const files = new DataTransfer();
            files.items.add(new File(["a"], "one.png", {type: "image/png"}));
            files.items.add(new File(["b"], "two.jpg", {type: "image/jpeg"}));
            files.items.add(new File(["c"], "list.txt", {type: "text/plain"}));
            document.getElementById("drop").dispatchEvent(new DragEvent("drop", {dataTransfer: files, bubbles: true}));
            return document.getElementById("filename").textContent;
        }""")
        assert dropped.startswith("Chosen: 2 photos") and "1 file skipped" in dropped and "list.txt" in dropped

        # too large for one request: the service's 413, said, and what to do
        page.set_input_files("#file", [str(p) for p in big])
        page.click("#submit")
        expect(page.locator("#error")).to_contain_text("SUPIR_MAX_BATCH_UPLOAD_BYTES", timeout=30_000)
        assert page.inner_text("#error").endswith("Send fewer photos at a time.")
        expect(page.locator("#file")).to_have_attribute("aria-invalid", "true")
        expect(page.locator("#batch-status")).to_have_text("Not accepted: nothing was queued.")

        # a file named .png that is not one: the whole batch refused, the photo named with its item
        odd = tmp_path / "odd"
        write_photos(odd, [(64, 48)])
        (odd / "scan.png").write_text("not a picture at all")
        page.set_input_files("#folder", str(odd))
        expect(page.locator("#error")).to_be_empty()  # the next action clears the last error
        page.click("#submit")
        expect(error).to_contain_text("Photo “odd/scan.png” (items[1]): Not a PNG, JPEG", timeout=30_000)
        expect(page.locator("#folder")).to_have_attribute("aria-invalid", "true")
        assert serious_violations(page) == []

        # small photos: one multipart request, queued; then canceled by keyboard
        small = write_photos(tmp_path / "small", [(64, 48), (48, 64)])
        page.set_input_files("#file", [str(p) for p in small])
        sent.clear()
        tab_to(page, "#submit")
        page.keyboard.press("Enter")
        expect(page.locator("#batch-status")).to_have_text("0 of 2 done.", timeout=30_000)
        assert not [s for s in sent if "/v1/uploads" in s], sent
        assert [s for s in sent if s.startswith("POST ") and "/v1/batches" in s and "multipart/form-data" in s], sent
        batch_id = page.inner_text("#batch-id").removeprefix(" · ")
        assert serious_violations(page) == []
        tab_to(page, "#batch-cancel")
        page.keyboard.press("Enter")
        expect(page.locator("#batch-status")).to_have_text("Batch ended: 2 of 2 done, 2 canceled.", timeout=30_000)
        assert "Canceling…" in page.evaluate("window.__batch")
        expect(page.locator("#batch-zip")).to_be_hidden()
        expect(page.locator("#batch-eta")).to_have_text("Nothing to download: no photo was restored.")
        assert page.evaluate("document.activeElement.id") == "batch-title"  # not lost with the button
        with alone.client("alice") as client:
            view = client.get(f"/v1/batches/{batch_id}").json()
            assert view["counts"]["canceled"] == 2 and view["status"] == "ended", view
            job = client.get(f"/v1/jobs/{view['job_ids'][0]}").json()
            assert (job["params"]["min_size"], job["params"]["steps"]) == (64, 2)
        no_horizontal_overflow(page)
        assert serious_violations(page) == []
        page.context.close()
