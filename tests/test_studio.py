"""MedTune Studio's safety parts without a browser: the path guard, the token middleware on a real aiohttp
server, the settings parser and the ``medtune studio`` command line (the whole page: test_studio_browser.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from medtune.errors import MedTuneError
from medtune.studio.paths import PathGuard


@pytest.fixture(autouse=True)
def _close_built_studios(monkeypatch):
    """Every studio a test builds is closed after it, as ``medtune studio`` closes its own: each holds four EGL
    render windows, and GL contexts left to the interpreter's exit can crash it after the last test."""
    try:
        from medtune.studio import server as srv
    except ImportError:  # the studio extra is optional
        yield
        return
    built: list = []
    real_build = srv.build_studio

    def build(*args, **kwargs):
        result = real_build(*args, **kwargs)
        built.append(result[1])
        return result

    monkeypatch.setattr(srv, "build_studio", build)
    yield
    for studio in built:
        studio.close()


def test_close_frees_the_views_gl_contexts(tmp_path):
    """``Studio.close`` finalizes every view's render window: a rendered view holds a GL context, a closed one none
    (twice is harmless)."""
    pytest.importorskip("trame_slicer", reason="trame-slicer not installed (pip install -e '.[studio]')")
    from medtune.studio.server import build_studio, make_example_dataset

    ds = make_example_dataset(tmp_path / "ds", size=12, n_labeled=2, n_unlabeled=1)
    _, studio, _ = build_studio(ds, name="studio-close")
    views = studio.slicer_app.view_manager.get_views()
    assert len(views) == 4  # trame-slicer's "Axial Primary" layout: three slice views and a 3D view
    for view in views:
        view.render_window().Render()
    assert all(view.render_window().GetGenericContext() is not None for view in views)
    studio.close()
    studio.close()
    assert all(view.render_window().GetGenericContext() is None for view in views)


def test_path_guard_keeps_the_browser_inside_the_named_folders(tmp_path):
    ds, extra, outside = tmp_path / "ds", tmp_path / "extra", tmp_path / "outside"
    for folder in (ds / "images", extra, outside):
        folder.mkdir(parents=True)
    (ds / "images" / "a.nii.gz").write_bytes(b"x")
    (outside / "secret.nii.gz").write_bytes(b"x")
    (ds / "escape.nii.gz").symlink_to(outside / "secret.nii.gz")
    (ds / "escape_dir").symlink_to(outside, target_is_directory=True)
    (ds / "inside_link.nii.gz").symlink_to(ds / "images" / "a.nii.gz")
    guard = PathGuard([ds, extra])

    assert guard.resolve("images/a.nii.gz", must_exist=True) == (ds / "images" / "a.nii.gz").resolve()
    assert guard.resolve(str(extra / "new.nii.gz")) == (extra / "new.nii.gz").resolve()
    assert guard.resolve(ds) == ds.resolve()
    assert guard.resolve("inside_link.nii.gz") == (ds / "images" / "a.nii.gz").resolve()  # a link that stays in
    refusals = {
        "/etc/passwd": "outside the folders",
        str(outside / "secret.nii.gz"): "outside the folders",
        "../outside/secret.nii.gz": "contains '..'",
        "images/../../outside/secret.nii.gz": "contains '..'",
        "images/../images/a.nii.gz": "contains '..'",  # refused even when it would land inside
        "escape.nii.gz": "through a symbolic link",
        "escape_dir/secret.nii.gz": "through a symbolic link",
        str(tmp_path): "outside the folders",  # the parent of the dataset
        str(ds) + "_sibling/x": "outside the folders",  # a name sharing the dataset's prefix
        "": "choose a",
        "a\x00b": "NUL",
    }
    for text, expected in refusals.items():
        with pytest.raises(MedTuneError, match=expected.replace("(", r"\(").replace(".", r"\.")) as info:
            guard.resolve(text)
        assert "\n" not in str(info.value)
    with pytest.raises(MedTuneError, match="not found"):
        guard.resolve("images/missing.nii.gz", must_exist=True)
    with pytest.raises(MedTuneError, match="--allow-root"):
        guard.resolve("/etc/passwd")


def test_choice_lists_are_the_owners_lists():
    pytest.importorskip("torch", reason="medtune.export needs torch")
    from medtune import names
    from medtune.export.from_run import PRECISIONS
    from medtune.studio.app import PRECISIONS as STUDIO_PRECISIONS
    from medtune.studio.app import PROVIDERS

    assert STUDIO_PRECISIONS is PRECISIONS is names.PRECISIONS and PROVIDERS is names.PROVIDERS


def test_settings_lines_become_cli_overrides():
    from medtune.studio.app import parse_settings

    assert parse_settings("patch_size=[16, 16, 16]\n\n num_workers = 0 \nintensity=ct") == {
        "patch_size": "[16, 16, 16]", "num_workers": "0", "intensity": "ct"}  # fmt: skip
    assert parse_settings("") == {}
    with pytest.raises(MedTuneError, match="not KEY=VALUE"):
        parse_settings("patch_size [16, 16, 16]")
    with pytest.raises(MedTuneError, match="not KEY=VALUE"):
        parse_settings("=3")
    for bad in ("lr=$__import__('os').system('id')", "lr='$1+1'", "network_def=@other", "x=%/etc/cfg.json",
                "output_dir=/tmp/elsewhere", "dataset_dir=..\\up", "patch_size=[16, '$x']",
                "arch_kwargs={'_target_': 'os.system', 'command': 'id'}", "_target_=os.system"):  # fmt: skip
        with pytest.raises(MedTuneError, match="not allowed from the page"):
            parse_settings(bad)
    with pytest.raises(MedTuneError, match="not KEY=VALUE"):
        parse_settings("a.b=1")


def test_token_middleware_refuses_requests_without_the_token():
    """A real aiohttp server with the studio's middleware: no token -> 403; token -> cookie; cookie -> page."""
    aiohttp = pytest.importorskip("aiohttp", reason="aiohttp comes with the studio extra")
    from aiohttp import web

    from medtune.studio.auth import COOKIE, new_token, token_middleware

    token = new_token()
    assert len(token) >= 40 and token != new_token()

    async def scenario() -> dict:
        app = web.Application(middlewares=[token_middleware(token)])
        app.router.add_get("/", lambda r: web.Response(text="page"))
        app.router.add_get("/ws", lambda r: web.Response(text="socket"))
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        base = f"http://127.0.0.1:{port}"
        out = {}
        try:
            async with aiohttp.ClientSession() as s:
                for name, url, headers in (
                    ("none", base + "/", {}),
                    ("wrong", base + "/?token=" + token[:-1] + "x", {}),
                    ("wrong_cookie", base + "/", {"Cookie": f"{COOKIE}=nope"}),
                    ("ws_none", base + "/ws", {"Upgrade": "websocket", "Connection": "Upgrade"}),
                ):
                    async with s.get(url, headers=headers, allow_redirects=False) as r:
                        out[name] = (r.status, await r.text())
                async with s.get(f"{base}/?token={token}&x=1", allow_redirects=False) as r:
                    out["token"] = (r.status, r.headers.get("Location"), r.headers.get("Set-Cookie"))
                cookie = {"Cookie": f"{COOKIE}={token}"}
                async with s.get(base + "/", headers=cookie, allow_redirects=False) as r:
                    out["cookie"] = (r.status, await r.text())
                foreign = {**cookie, "Upgrade": "websocket", "Connection": "Upgrade", "Origin": "http://evil.test"}
                async with s.get(base + "/ws", headers=foreign, allow_redirects=False) as r:
                    out["ws_foreign"] = (r.status, await r.text())
        finally:
            await runner.cleanup()
        return out

    out = asyncio.run(scenario())
    for name in ("none", "wrong", "wrong_cookie", "ws_none"):
        assert out[name][0] == 403 and "needs its token" in out[name][1], (name, out[name])
    status, location, cookie = out["token"]
    assert status == 302 and location == "/?x=1" and "token" not in location  # the token leaves the address bar
    assert f"{COOKIE}={token}" in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    assert out["cookie"] == (200, "page")
    assert out["ws_foreign"][0] == 403 and "another origin" in out["ws_foreign"][1]


def test_studio_command_line(tmp_path, capsys):
    """``medtune studio`` parses its options; without the studio extra it says what to install (one line)."""
    from medtune.cli import build_parser
    from medtune.studio.server import is_loopback

    args = build_parser().parse_args(["studio", "--dataset", str(tmp_path), "--allow-root", "/a", "--allow-root", "/b"])
    assert (args.host, args.port, args.allow_root) == ("127.0.0.1", 0, ["/a", "/b"])
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5") and not is_loopback("example.org")
    try:
        import trame_slicer  # noqa: F401
    except ImportError:
        from medtune.cli import main

        assert main(["studio", "--dataset", str(tmp_path)]) == 1
        assert "pip install -e '.[studio]'" in capsys.readouterr().err


@pytest.mark.slow  # starts the server in a child process: 11 s at load 6-7
def test_non_loopback_host_prints_a_warning(tmp_path, monkeypatch, capsys):
    """``--host`` other than loopback is used only as asked, and warns before serving; loopback by default. The
    real studio is built; the one stand-in is the server's ``start`` (the bind): tests never listen beyond
    127.0.0.1."""
    pytest.importorskip("trame_slicer", reason="trame-slicer not installed (pip install -e '.[studio]')")
    from medtune.studio import server as srv

    real_build = srv.build_studio

    def serve_recording(name: str, **serve_kwargs) -> dict:
        started: dict = {}

        def build(*args, **kwargs):
            server, studio, token = real_build(*args, name=name, **kwargs)
            monkeypatch.setattr(server, "start", lambda **kw: started.update(kw, err=capsys.readouterr().err))
            return server, studio, token

        monkeypatch.setattr(srv, "build_studio", build)
        assert srv.serve(tmp_path / "new", **serve_kwargs) == 0
        return started

    wide = serve_recording("studio-host", host="0.0.0.0", port=8765)
    assert (wide["host"], wide["port"]) == ("0.0.0.0", 8765)
    assert "WARNING: listening on 0.0.0.0, reachable from other machines" in wide["err"]  # printed before serving
    assert not (tmp_path / "new").exists()  # a missing dataset is created only from the page
    default = serve_recording("studio-loop", port=8766)
    assert default["host"] == "127.0.0.1" and "WARNING" not in default["err"]


def test_page_actions_drive_the_module_session(tmp_path):
    """The panel's actions (no browser): open, import a NIfTI volume + label map with Slicer's readers, refuse a
    path outside, next case, save; the files are the Slicer module's (same ``MedTuneSession``)."""
    pytest.importorskip("trame_slicer", reason="trame-slicer not installed (pip install -e '.[studio]')")
    import asyncio
    import shutil

    import nibabel as nib
    import numpy as np

    from medtune.studio.server import build_studio, make_example_dataset

    ds = make_example_dataset(tmp_path / "ds", size=12, n_labeled=2, n_unlabeled=1)
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    for name in ("images", "labels"):
        shutil.copy(ds / name / "case_0001.nii.gz", incoming / f"{name}.nii.gz")
    server, studio, token = build_studio(ds, [incoming], name="studio-unit")
    state = studio.state
    assert state.mt_dataset_open and "1: inner" in state.mt_dataset_info and len(state.mt_cases) == 3
    state.mt_import_path, state.mt_import_label_path = str(incoming / "images.nii.gz"), str(incoming / "labels.nii.gz")
    studio.action(studio.import_volume)
    assert state.mt_error == "", state.mt_error
    new_id = state.mt_status.split(" as ")[1].rstrip(".")
    ref = nib.load(incoming / "labels.nii.gz")
    got = nib.load(ds / "labels" / f"{new_id}.nii.gz")
    np.testing.assert_array_equal(np.asarray(got.dataobj), np.asarray(ref.dataobj))  # label values kept
    assert np.allclose(got.affine, ref.affine, atol=1e-5)
    state.mt_import_path, state.mt_import_label_path = "/etc/hostname", ""
    studio.action(studio.import_volume)
    assert "refused" in state.mt_error and "outside the folders" in state.mt_error
    asyncio.run(studio.next_case())
    assert state.mt_case_id == "case_0003" and not state.mt_unsaved
    assert "previous version kept" in studio.save_labels()
    assert {c["id"]: c["status"] for c in state.mt_cases}["case_0003"] == "labeled"


def test_class_picker_for_a_classification_dataset(tmp_path):
    """A 2D classification dataset: next case shows the image, the class picker's value is saved to the datalist."""
    pytest.importorskip("trame_slicer", reason="trame-slicer not installed (pip install -e '.[studio]')")
    import asyncio
    import json

    from medtune.data import make_synthetic_classification
    from medtune.studio.server import build_studio

    ds = tmp_path / "cls"
    make_synthetic_classification(ds, n_train=4, n_val=2, size=16, seed=3)
    data = json.loads((ds / "datalist.json").read_text())
    unlabeled = data["validation"].pop()
    data["testing"] = [{"image": unlabeled["image"]}]
    (ds / "datalist.json").write_text(json.dumps(data))
    server, studio, _ = build_studio(ds, name="studio-cls")
    state = studio.state
    assert state.mt_is_classification and [i["value"] for i in state.mt_class_items] == [0, 1]
    asyncio.run(studio.next_case())
    case_id = state.mt_case_id
    assert state.mt_error == "" and unlabeled["image"].endswith(f"{case_id}.png")
    state.mt_class_value = 1
    assert "class" in studio.save_labels()
    saved = json.loads((ds / "datalist.json").read_text())
    assert {"image": unlabeled["image"], "label": 1} in saved["training"]
    assert not saved.get("testing")


def test_dicom_series_import_through_an_allowed_root(tmp_path):
    """A real MR DICOM series (shared data, optional) imported from a folder named with --allow-root."""
    pytest.importorskip("trame_slicer", reason="trame-slicer not installed (pip install -e '.[studio]')")
    import nibabel as nib
    from helpers import SHARED_DATA

    from medtune.runtime.dicom import read_dicom_series
    from medtune.studio.server import build_studio, make_example_dataset

    root = SHARED_DATA / "dicom"
    series = next(iter(sorted(root.glob("*/*/*/*.dcm"))), None) if root.is_dir() else None
    if series is None:
        pytest.skip(f"no DICOM series under {root} (shared data is optional)")
    ds = make_example_dataset(tmp_path / "ds", size=12, n_labeled=2, n_unlabeled=1)
    _, studio, _ = build_studio(ds, [root], name="studio-dicom")
    studio.state.mt_dicom_path = str(series.parent)
    studio.action(studio.import_dicom)
    assert studio.state.mt_error == "", studio.state.mt_error
    case_id = studio.state.mt_status.rstrip(".").split(" as ")[1]
    img = nib.load(ds / "images" / f"{case_id}.nii.gz")
    ref = read_dicom_series(series.parent)
    assert img.shape == ref.array.shape and abs(img.affine - ref.affine).max() < 1e-4
    studio.state.mt_dicom_path = str(root.parent)  # the shared data folder itself is not a named root
    studio.action(studio.import_dicom)
    assert "outside the folders" in studio.state.mt_error


@pytest.mark.slow
def test_finetune_cancel_and_resume_from_the_panel(tmp_path):
    """Fine-tune (child process) -> Cancel kills it (run marked cancelled, resumable) -> Resume completes it."""
    pytest.importorskip("trame_slicer", reason="trame-slicer not installed (pip install -e '.[studio]')")
    import time

    from medtune.studio.server import build_studio, make_example_dataset

    ds = make_example_dataset(tmp_path / "ds", size=16, n_labeled=4, n_unlabeled=1)
    _, studio, _ = build_studio(ds, name="studio-ft")
    s = studio.state
    s.mt_arch, s.mt_pretrained, s.mt_epochs, s.mt_device = "tiny_unet", "none", 8, "cpu"
    s.mt_settings_text = "patch_size=[16, 16, 16]\nnum_workers=0"

    def poll_until(done, timeout: float = 900.0) -> None:  # 300 s ran out at load 7-9 (8 epochs, ETA 7 min)
        deadline = time.monotonic() + timeout
        while not done():
            assert time.monotonic() < deadline, s.mt_ft_text
            studio._apply_report(studio.session.poll())
            time.sleep(0.3)

    studio.action(studio.start_finetune)
    assert s.mt_error == "" and s.mt_ft_running
    run = Path(s.mt_run_path)
    poll_until(lambda: (run / "checkpoint_last.pt").is_file() or not s.mt_ft_running)  # after epoch 1's checkpoint
    assert s.mt_ft_running, f"finished before it could be cancelled: {s.mt_ft_text}"
    process = studio.session.job.process
    studio.action(studio.cancel_finetune)
    assert process.poll() is not None and s.mt_ft_status == "cancelled" and not s.mt_ft_running
    assert s.mt_ft_resumable, "a cancelled run with a checkpoint can be resumed"
    studio.action(studio.start_finetune, True)
    assert s.mt_error == "", s.mt_error
    poll_until(lambda: not s.mt_ft_running)
    assert s.mt_ft_status == "completed" and s.mt_ft_progress == 100 and "epoch 8/8" in s.mt_ft_text, s.mt_ft_text


def test_create_a_dataset_from_the_page_and_guard_finetune_inputs(tmp_path):
    """A new folder becomes a dataset with the typed labels; fine-tune inputs that name files are guarded."""
    pytest.importorskip("trame_slicer", reason="trame-slicer not installed (pip install -e '.[studio]')")
    import json

    from medtune.studio.server import build_studio

    _, studio, _ = build_studio(tmp_path / "new_ds", name="studio-new")
    s = studio.state
    assert not s.mt_dataset_open and not (tmp_path / "new_ds").exists()
    s.mt_labels_text = "1: liver, 2: tumor"
    studio.action(studio.open_dataset)
    assert s.mt_error == "" and s.mt_dataset_open and s.mt_cases == []
    meta = json.loads((tmp_path / "new_ds" / "dataset.json").read_text())
    assert meta["task"] == "segmentation" and meta["labels"] == {"0": "background", "1": "liver", "2": "tumor"}
    s.mt_dataset_path = "../elsewhere"
    studio.action(studio.open_dataset)
    assert "contains '..'" in s.mt_error
    s.mt_pretrained = "local:/etc/passwd"
    studio.action(studio.start_finetune)
    assert "refused" in s.mt_error and studio.session.job is None
    s.mt_pretrained, s.mt_run_path = "none", "/tmp/run_outside"
    studio.action(studio.start_finetune)
    assert "refused" in s.mt_error and studio.session.job is None


@pytest.mark.slow  # a 2-fold tiny run in this process + an export child process
def test_kfold_run_is_listed_with_its_estimate_and_exports_the_ensemble(tmp_path):
    """A K-fold run folder under runs/: listed as an ensemble with its honest figure (from its estimate.json),
    chosen as the run folder, exported from the page into one ONNX averaging the fold models."""
    pytest.importorskip("trame_slicer", reason="trame-slicer not installed (pip install -e '.[studio]')")
    pytest.importorskip("torch", reason="torch (training extra) not installed")
    import json
    import time

    from medtune.data import make_synthetic_classification
    from medtune.finetune.crossval import crossvalidate
    from medtune.studio.app import parse_folds
    from medtune.studio.server import build_studio

    ds = tmp_path / "cls"
    make_synthetic_classification(ds, n_train=16, n_val=4, size=32, seed=3)
    tiny = {"arch": "tiny_cnn", "pretrained": "none", "epochs": 1, "batch_size": 8, "num_workers": 0,
            "image_size": [32, 32]}  # fmt: skip
    run = ds / "runs" / "run_cv"
    crossvalidate(ds, "2d_classification", run, 2, overrides=tiny, progress_bar=False, n_bootstrap=50)
    _, studio, _ = build_studio(ds, name="studio-folds")
    s = studio.state
    value = json.loads((run / "estimate.json").read_text())["honest"]["estimate"]["value"]
    [listed] = s.mt_runs
    assert (listed["name"], listed["kind"], listed["status"]) == ("run_cv", "2-fold ensemble", "completed")
    assert f"AUC {value:.3f}" in listed["estimate"] and "cross-validated, out-of-fold" in listed["estimate"]
    assert (parse_folds(""), parse_folds(" 0 "), parse_folds("5")) == (None, 0, 5)
    with pytest.raises(MedTuneError, match="folds must be"):
        parse_folds("1")
    s.mt_run_path = listed["path"]
    studio.action(studio.start_export)
    assert s.mt_error == "" and s.mt_exporting
    deadline = time.monotonic() + 300
    while s.mt_exporting:
        assert time.monotonic() < deadline, s.mt_export_text
        studio._apply_report(studio.session.poll())
        time.sleep(0.3)
    assert s.mt_error == "" and "2-model fold ensemble" in s.mt_export_text and s.mt_parity_passed
    side = json.loads((Path(s.mt_model_path).parent / "model.json").read_text())
    assert side["ensemble"]["members"] == 2
