"""``medtune studio``: build the page, guard it with the session token, print the URL, serve until stopped."""

from __future__ import annotations

import ipaddress
import socket
import sys
from pathlib import Path
from typing import Any

from medtune.errors import MedTuneError

from .auth import new_token, token_middleware
from .paths import PathGuard

LOOPBACK = "127.0.0.1"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def free_port(host: str = LOOPBACK) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def check_studio_installed() -> None:
    """One line naming the install command when trame-slicer (the studio extra) is missing."""
    try:
        import trame_slicer  # noqa: F401
    except ImportError as exc:
        raise MedTuneError(
            f"MedTune Studio needs the studio extra ({exc.name} is missing): pip install -e '.[studio]'"
        ) from None


def make_example_dataset(folder: str | Path, size: int = 24, n_labeled: int = 6, n_unlabeled: int = 2,
                         seed: int = 5) -> Path:  # fmt: skip
    """A tiny SYNTHETIC 3D segmentation dataset to try the studio: labeled cases plus unlabeled ones to label."""
    import json

    from medtune.data.synthetic import make_synthetic_segmentation

    folder = Path(folder)
    if folder.exists():
        raise MedTuneError("--example writes a new dataset; this folder exists already", folder)
    make_synthetic_segmentation(folder, n_train=n_labeled + n_unlabeled - 1, n_val=1, size=size, seed=seed)
    data = json.loads((folder / "datalist.json").read_text(encoding="utf-8"))
    cases = data["training"] + data["validation"]
    for entry in cases[n_labeled:]:
        (folder / entry["label"]).unlink()
    datalist = {"training": cases[:n_labeled], "testing": [{"image": e["image"]} for e in cases[n_labeled:]]}
    (folder / "datalist.json").write_text(json.dumps(datalist, indent=1), encoding="utf-8")
    return folder


def build_studio(dataset: str | Path, allow_roots: list[str | Path] | None = None, token: str | None = None,
                 name: str = "medtune-studio") -> tuple[Any, Any, str]:  # fmt: skip
    """``(trame server, Studio, token)``: the app with the token middleware installed (not started)."""
    check_studio_installed()
    from trame.app import get_server

    from .app import Studio

    dataset = Path(dataset).expanduser().resolve()
    if dataset.exists() and not dataset.is_dir():
        raise MedTuneError("--dataset must be a folder", dataset)
    roots = [dataset, *(Path(r).expanduser().resolve() for r in allow_roots or [])]
    for root in roots[1:]:
        if not root.is_dir():
            raise MedTuneError("--allow-root must be an existing folder", root)
    guard = PathGuard(roots)
    token = token or new_token()
    server = get_server(name, client_type="vue3")
    studio = Studio(server, dataset, guard)

    def bind(wslink_server: Any) -> None:
        wslink_server.app.middlewares.append(token_middleware(token))  # first: nothing unchecked gets further
        wslink_server.app.middlewares.append(count_tabs(studio))

    server.controller.on_server_bind.add(bind)
    return server, studio, token


def count_tabs(studio: Any) -> Any:
    """An aiohttp middleware telling the studio how many tabs hold a websocket (the shared-session badge)."""
    from aiohttp import web

    @web.middleware
    async def counter(request: web.Request, handler: Any) -> Any:
        if request.headers.get("Upgrade", "").lower() != "websocket":
            return await handler(request)
        studio.clients_changed(+1)
        try:
            return await handler(request)
        finally:
            studio.clients_changed(-1)

    return counter


def serve(dataset: str | Path, host: str = LOOPBACK, port: int = 0, allow_roots: list[str | Path] | None = None,
          token: str | None = None, open_browser: bool = False, example: bool = False) -> int:  # fmt: skip
    """Serve the studio on ``host:port`` (0: a free port) until Ctrl+C; prints the URL with its token.

    Loopback by default; another address is only used when asked for, with a warning.
    """
    if example:
        make_example_dataset(dataset)
        print(f"medtune studio: wrote a SYNTHETIC example dataset (not patient data) to {dataset}")
    port = port or free_port(LOOPBACK if is_loopback(host) else host)
    server, studio, token = build_studio(dataset, allow_roots, token)
    if example:  # quick first run on CPU: the example's volumes are 24^3
        studio.state.mt_settings_text, studio.state.mt_epochs = "patch_size=[24, 24, 24]\nnum_workers=0", 5
    url = f"http://{host}:{port}/?token={token}"
    if not is_loopback(host):
        print(f"medtune studio: WARNING: listening on {host}, reachable from other machines; anyone with the "
              "token below can edit this dataset. Prefer an SSH tunnel to 127.0.0.1.", file=sys.stderr)  # fmt: skip
    print(f"medtune studio: dataset {Path(dataset).resolve()}; files reachable: {studio.guard.describe()}")
    print(f"medtune studio: open {url}", flush=True)
    argv = sys.argv
    sys.argv = argv[:1]  # trame parses sys.argv (it has its own --host/--port): keep ours out of it
    try:
        server.start(host=host, port=port, open_browser=open_browser, show_connection_info=False, timeout=0)
    finally:
        sys.argv = argv
        for path in studio.shutdown():
            print(f"medtune studio: unsaved labels kept in {path}", file=sys.stderr)
        studio.close()
    return 0
