"""Fixtures and helpers shared by the tests of the archive-based adapters (CSS3D, MIT-States, Fashion200k)."""
from __future__ import annotations

import http.server
import threading
import zipfile
from pathlib import Path

import pytest

pytest_plugins = ["fail_on_skip"]  # .ci/run: a skipped test fails the run


@pytest.fixture(scope="session")
def tiny_composed(tmp_path_factory):
    """A tiny TIRG pretrained in-process on the tiny repo's shapes, its index and per-query results
    (tests/tiny_inprocess.py), built once for every test that asks."""
    from tiny_inprocess import build

    return build(tmp_path_factory.mktemp("tiny_composed"))


@pytest.fixture
def server(tmp_path):
    """A static HTTP server on 127.0.0.1 serving tmp_path/served; yields (folder, base URL, requests)."""
    served = tmp_path / "served"
    served.mkdir()
    requests: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(served), **kwargs)

        def do_GET(self):
            requests.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{httpd.server_address[1]}", requests
    httpd.shutdown()
    httpd.server_close()


def zip_folder(folder: Path, archive: Path, prefix: str, extra: dict[str, bytes] | None = None) -> None:
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                zf.write(path, f"{prefix}{path.relative_to(folder).as_posix()}")
        for name, data in (extra or {}).items():
            zf.writestr(name, data)
