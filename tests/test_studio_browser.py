"""MedTune Studio end to end in real Chromium (Playwright), on a real `medtune studio` server (trame-slicer,
slicer-core), with a tiny synthetic dataset made here. No mock: the token is checked by the real server, the
stroke is painted with the mouse in the axial view, the label file is read back with nibabel, fine-tuning and
export are real child processes, and the run's segmentation is looked for in the view's pixels.

Screenshots of each step: ``<tmp>/studio*/screenshots/NN_step.png`` (the path is printed).
Needs the studio extra, ``playwright`` (Python package; no browser download) and Debian's ``chromium``
(``.ci/browser`` installs both); skipped with the reason otherwise.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.browser

pytest.importorskip("trame_slicer", reason="trame-slicer not installed (pip install -e '.[studio]')")
nib = pytest.importorskip("nibabel")

CHROMIUM = os.environ.get("MEDTUNE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]  # fmt: skip
LABELS = {0: "background", 1: "inner", 2: "outer"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _make_dataset(root: Path) -> tuple[Path, Path, Path]:
    """6 labeled + 2 unlabeled 16^3 synthetic cases; an outside file; an extra volume in an allowed root."""
    from medtune.studio.server import make_example_dataset

    ds = make_example_dataset(root / "ds", size=16, n_labeled=6, n_unlabeled=2, seed=5)  # what --example writes
    incoming = root / "incoming"
    incoming.mkdir()
    shutil.copy(ds / "images" / "case_0001.nii.gz", incoming / "scan.nii.gz")
    outside = root / "outside"
    outside.mkdir()
    shutil.copy(ds / "images" / "case_0001.nii.gz", outside / "secret.nii.gz")
    (ds / "link.nii.gz").symlink_to(outside / "secret.nii.gz")  # a link inside the dataset pointing out of it
    return ds, incoming, outside


class StudioProcess:
    """``python -m medtune studio`` as a child (own process group), stopped with Ctrl+C semantics."""

    def __init__(self, dataset: Path, allow: Path, log: Path) -> None:
        self.port = _free_port()
        cmd = [sys.executable, "-m", "medtune", "studio", "--dataset", str(dataset), "--port", str(self.port),
               "--allow-root", str(allow)]  # fmt: skip
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
        self.log = log
        self._log_fh = open(log, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._log_fh, text=True, env=env,
                                     start_new_session=True)  # fmt: skip
        self.lines: list[str] = []
        self.url = ""
        ready = threading.Event()

        def read() -> None:
            for line in self.proc.stdout:
                self.lines.append(line)
                if "open http" in line:
                    self.url = line.split("open ", 1)[1].strip()
                    ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(180):
            self.stop()
            pytest.fail(f"medtune studio did not start: {''.join(self.lines)} {log.read_text()[-2000:]}")
        self.base = f"http://127.0.0.1:{self.port}"
        self.token = self.url.split("token=", 1)[1]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # the URL is printed just before the socket listens
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    break
            except OSError:
                time.sleep(0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._log_fh.close()


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("studio")


@pytest.fixture(scope="module")
def studio(work):
    ds, incoming, _ = _make_dataset(work)
    proc = StudioProcess(ds, incoming, work / "server.log")
    proc.dataset, proc.incoming = ds, incoming
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright not installed (pip install playwright)")
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install -y chromium)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


def _get(url: str, cookie: str | None = None) -> tuple[int, str, dict]:
    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):
            return None

    req = urllib.request.Request(url, headers={"Cookie": cookie} if cookie else {})
    opener = urllib.request.build_opener(NoRedirect)
    try:
        with opener.open(req, timeout=20) as resp:
            return resp.status, resp.read().decode("utf-8", "replace"), dict(resp.headers)
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode("utf-8", "replace"), dict(err.headers)


def test_plain_http_requests_need_the_token(studio):
    """Without the session's token every path is refused before trame sees it, the websocket included."""
    for path in ("/", "/index.html", "/ws", "/trame.js", "/../etc/passwd"):
        status, body, _ = _get(studio.base + path)
        assert status == 403 and "needs its token" in body, (path, status, body[:200])
    assert _get(studio.base + "/?token=wrong" + studio.token[5:])[0] == 403
    status, _, headers = _get(f"{studio.base}/?token={studio.token}")
    assert status == 302 and headers["Location"] == "/"
    cookie = headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    status, body, _ = _get(studio.base + "/index.html", cookie=cookie.split(";")[0])
    assert status == 200 and "<html" in body.lower()
    assert studio.url.startswith("http://127.0.0.1:")  # loopback by default


def _axial(page):
    """The axial view (the largest view of trame-slicer's 'Axial Primary' layout)."""
    views = page.locator(".remote-controlled-area")
    boxes = [(views.nth(i), views.nth(i).bounding_box()) for i in range(views.count())]
    return max(boxes, key=lambda vb: vb[1]["width"] * vb[1]["height"])


def _colored_pixels(page) -> int:
    """Pixels of the axial view with a hue (segments are coloured; the synthetic image is grey)."""
    from io import BytesIO

    from PIL import Image

    view, _ = _axial(page)
    rgb = np.asarray(Image.open(BytesIO(view.screenshot())).convert("RGB")).astype(int)
    return int(((rgb.max(axis=2) - rgb.min(axis=2)) > 60).sum())


def _wait_text(page, selector: str, needle: str, timeout: float) -> str:
    page.wait_for_function(
        "([s, n]) => { const e = document.querySelector(s); return e && e.textContent.includes(n); }",
        arg=[selector, needle], timeout=timeout * 1000,
    )  # fmt: skip
    return page.inner_text(selector)


def _error_after(page, button: str) -> str:
    page.click(button)
    page.wait_for_selector("#mt-error", timeout=20000)
    text = page.inner_text("#mt-error")
    page.click("#mt-error button")  # close it for the next check
    page.wait_for_selector("#mt-error", state="detached", timeout=10000)
    return text


def test_labeling_loop_in_the_browser(studio, browser, work):
    from medtune.runtime.segment import load_volume_model, segment_file

    shots = work / "screenshots"
    shots.mkdir(exist_ok=True)
    print(f"\nstudio screenshots: {shots}")
    n = iter(range(1, 100))

    def shot(page, name: str) -> None:
        page.screenshot(path=str(shots / f"{next(n):02d}_{name}.png"))

    ds = studio.dataset
    context = browser.new_context(viewport={"width": 1600, "height": 900})
    page = context.new_page()

    # 1. without the token the page is refused; with it the dataset opens
    page.goto(studio.base + "/")
    assert "needs its token" in page.content()
    shot(page, "refused_without_token")
    page.goto(studio.url)
    page.wait_for_selector("#mt-next-case", timeout=90000)
    assert "segmentation (3D)" in _wait_text(page, "#mt-dataset-info", "labels", 30)
    shot(page, "opened_with_token")

    # 2. paths outside the dataset and the named folders are refused with a message; inside ones work
    for text, expected in (("/etc/passwd", "outside the folders"), ("../outside/secret.nii.gz", "contains '..'"),
                           (str(work / "outside" / "secret.nii.gz"), "outside the folders"),
                           ("link.nii.gz", "through a symbolic link")):  # fmt: skip
        page.fill("#mt-import-path", text)
        message = _error_after(page, "#mt-import")
        assert "refused" in message and expected in message, (text, message)
    page.fill("#mt-import-path", "/etc/passwd")
    page.click("#mt-import")
    page.wait_for_selector("#mt-error", timeout=20000)
    shot(page, "path_outside_refused")
    page.click("#mt-error button")
    page.fill("#mt-import-path", str(studio.incoming / "scan.nii.gz"))  # inside --allow-root
    page.click("#mt-import")
    imported = _wait_text(page, "#mt-status", "Imported scan.nii.gz", 30).split(" as ")[1].rstrip(".")
    assert imported in page.inner_text("#mt-cases")
    entries = json.loads((ds / "datalist.json").read_text())["testing"]
    assert entries[-1] == {"image": f"images/{imported}.nii.gz"}

    # 3. next case (no model yet: datalist order); a second tab shows the same session live
    page.click("#mt-next-case")
    assert _wait_text(page, "#mt-case-id", "case_0007", 60) == "case_0007"
    page2 = context.new_page()
    page2.goto(studio.url)
    assert _wait_text(page2, "#mt-case-id", "case_0007", 60) == "case_0007"
    assert "2 tab(s)" in _wait_text(page, "#mt-clients", "2 tab(s)", 30)
    shot(page2, "second_tab_same_session")
    page2.close()
    shot(page, "next_case")

    # 4. paint a stroke with the mouse in the axial view (Paint effect, segment 'inner'), then save
    page.click("#mt-effects button:has(i.mdi-brush)")
    view, box = _axial(page)
    y = box["y"] + box["height"] * 0.5
    x0, x1 = box["x"] + box["width"] * 0.2, box["x"] + box["width"] * 0.5
    page.mouse.move(x0, y)
    time.sleep(1.0)  # let the view settle (the server renders every frame) before pressing
    page.mouse.down()
    for step in range(1, 16):
        page.mouse.move(x0 + (x1 - x0) * step / 15, y)
        time.sleep(0.05)
    page.mouse.up()
    page.wait_for_selector("#mt-unsaved", timeout=20000)
    shot(page, "painted_stroke")
    page.click("#mt-save")
    assert "previous version kept" in _wait_text(page, "#mt-status", "saved", 30)
    shot(page, "saved")
    label = nib.load(ds / "labels" / "case_0007.nii.gz")
    image = nib.load(ds / "images" / "case_0007.nii.gz")
    assert label.shape == image.shape and np.allclose(label.affine, image.affine, atol=1e-5)
    mask = np.asarray(label.dataobj)
    painted = np.argwhere(mask > 0)  # (i, j, k) voxel indices
    assert set(np.unique(mask)) == {0, 1}, "the stroke is label 1 (inner, the selected segment)"
    # the view shows the middle axial slice fitted to its width, patient right on screen left: a stroke from
    # 20% to 50% of the width at mid-height covers i ~ 7.5 + 16 * (0.5 - [0.2, 0.5]) = 8 .. 12.3, j ~ 8
    assert 3 <= len(painted) <= 60, len(painted)
    assert painted[:, 0].min() >= 6 and painted[:, 0].max() <= 14 and np.ptp(painted[:, 0]) >= 2, painted
    assert np.abs(painted[:, 1] - 7.5).max() <= 3, painted
    assert set(painted[:, 2]) <= {7, 8}, painted  # the slice on screen, not the whole volume
    ras = nib.affines.apply_affine(image.affine, painted)
    assert np.all(ras[:, 0] > 5.0), "painted on the patient's right (screen left) half"

    # 5. fine-tune a tiny network for one epoch (child process) and see the progress reach the end
    page.uncheck("#mt-use-model")
    page.fill("#mt-arch", "tiny_unet")
    page.fill("#mt-pretrained", "none")
    page.fill("#mt-epochs", "1")
    page.fill("#mt-settings", "patch_size=[16, 16, 16]\nnum_workers=0")
    page.click("#mt-finetune")
    _wait_text(page, "#mt-ft-text", "starting", 30)
    shot(page, "finetune_started")
    # the page keeps answering while the child process trains: load another case meanwhile
    page.locator("#mt-cases .v-list-item", has_text="case_0001").click()
    _wait_text(page, "#mt-case-id", "case_0001", 30)
    assert "completed" not in page.inner_text("#mt-ft-text"), "the case loaded while fine-tuning ran"
    text = _wait_text(page, "#mt-ft-text", "completed", 240)
    assert text.startswith("100%") and "epoch 1/1" in text and "val_mean_dice" in text, text
    shot(page, "finetune_completed")
    run = Path(page.input_value("#mt-run-path"))
    assert run.parent == ds / "runs" and (run / "model.pt").is_file()

    # 6. export (child process, parity gate) with the parity result shown
    page.click("#mt-export")
    text = _wait_text(page, "#mt-export-text", "exported", 180)
    assert "parity on" in text and "max abs error" in text, text
    sidecar = json.loads((ds / "models" / f"{run.name}_fp32" / "model.json").read_text())
    assert sidecar["export"]["parity"]["passed"]
    shot(page, "exported")
    model = ds / "models" / f"{run.name}_fp32" / "model.onnx"
    assert page.input_value("#mt-model-path") == str(model)

    # 7. next case without pre-fill, then run the model on it: the segmentation appears in the views
    page.click("#mt-next-case")
    _wait_text(page, "#mt-case-id", "case_0008", 60)
    time.sleep(1.5)
    before = _colored_pixels(page)
    page.click("#mt-run")
    text = _wait_text(page, "#mt-run-text", "mean entropy", 120)
    segment_file(load_volume_model(model), ds / "images" / "case_0008.nii.gz", work / "runtime.nii.gz")
    runtime = np.asarray(nib.load(work / "runtime.nii.gz").dataobj)
    values, counts = np.unique(runtime, return_counts=True)
    assert len(values) >= 2, "the 1-epoch model predicts some foreground on this seed"
    for value, count in zip(values, counts, strict=True):
        if value:
            assert f"label {value}: {count} voxels" in text, (text, value, count)
    time.sleep(1.5)
    after = _colored_pixels(page)
    shot(page, "run_segmentation_shown")
    assert before < 20 and after > before + 50, (before, after)

    # 8. unsaved edits are never dropped silently: leaving the case asks (Stay keeps them, Discard drops them)
    page.click("#mt-effects button:has(i.mdi-brush)")
    page.mouse.move(x0, y)
    time.sleep(1.0)
    page.mouse.down()
    page.mouse.move(x1, y + 20, steps=10)
    page.mouse.up()
    page.wait_for_selector("#mt-unsaved", timeout=20000)
    page.click("#mt-next-case")
    page.wait_for_selector("#mt-confirm", timeout=20000)
    assert "case_0008 has unsaved labels" in page.inner_text("#mt-confirm")
    shot(page, "unsaved_labels_asked")
    page.click("#mt-confirm-stay")
    page.wait_for_selector("#mt-confirm", state="detached", timeout=10000)
    assert page.inner_text("#mt-case-id") == "case_0008" and page.locator("#mt-unsaved").count() == 1

    # 9. with pre-fill on, next case is the most uncertain one, pre-filled by the model (after Discard)
    page.check("#mt-use-model")
    page.click("#mt-next-case")
    page.wait_for_selector("#mt-confirm", timeout=20000)
    page.click("#mt-confirm-discard")
    status = _wait_text(page, "#mt-status", "pre-filled by the model", 120)
    case_id = page.inner_text("#mt-case-id")
    assert case_id in status
    uncertainty = json.loads((ds / "predictions" / "uncertainty.json").read_text())
    ranked = sorted(uncertainty["cases"].items(), key=lambda kv: -kv[1]["entropy"])
    assert {"case_0008", imported} <= set(uncertainty["cases"]) and case_id == ranked[0][0]
    assert (ds / "predictions" / f"{case_id}.nii.gz").is_file()
    assert not (ds / "labels" / "case_0008.nii.gz").exists(), "discarded edits are not saved"
    time.sleep(1.5)
    shot(page, "next_case_prefilled")
    predicted = np.asarray(nib.load(ds / "predictions" / f"{case_id}.nii.gz").dataobj)
    if predicted.any():
        assert _colored_pixels(page) > 20

    # 10. stopping the server with unsaved edits keeps them (never lost silently)
    # the same stroke as in step 4 covers the same voxels (same grid, same fit): erase if they are all 'inner'
    all_inner = bool((predicted[tuple(painted.T)] == 1).all())
    page.click("#mt-effects button:has(i.mdi-eraser)" if all_inner else "#mt-effects button:has(i.mdi-brush)")
    page.mouse.move(x0, y)
    time.sleep(1.0)
    page.mouse.down()
    page.mouse.move(x1, y, steps=10)
    page.mouse.up()
    page.wait_for_selector("#mt-unsaved", timeout=20000)
    context.close()
    studio.stop()
    kept = list((ds / ".versions" / "unsaved").glob(f"{case_id}_*.nii.gz"))
    assert len(kept) == 1, studio.log.read_text()[-2000:]
    assert nib.load(kept[0]).shape == predicted.shape
