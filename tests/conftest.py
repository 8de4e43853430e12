"""Fixtures and helpers shared by the tests of the archive-based adapters (CSS3D, MIT-States, Fashion200k)."""
from __future__ import annotations

import http.server
import os
import threading
import zipfile
from pathlib import Path

import pytest

pytest_plugins = ["fail_on_skip"]  # .ci/run: a skipped test fails the run

MAX_WORKERS = 4  # `-n auto` (pyproject.toml): a cap on many-core machines (measured: 2 workers on 2 cores)


def _drop_prefect_exit_hooks_in_child() -> None:
    """Prefect's API log worker registers a drain with `threading._register_atexit`; its own fork handler then
    resets the worker in a forked child (`_done_event = None`) but leaves that hook, so the child fails at exit
    (AssertionError in QueueService._drain, exit code 1 with nothing printed). A DataLoader worker forked by a test
    process that ran a Prefect flow in-process (tests/test_parallel.py, test_pipelines.py: flows in the pytest
    process) therefore "exited unexpectedly" at the end of its loader. The stages never run Prefect in a process
    that forks DataLoader workers, so only the test processes need this (prefect 3, private `threading` list)."""
    threading._threading_atexits[:] = [hook for hook in threading._threading_atexits
                                       if not getattr(getattr(hook, "func", hook), "__module__", "").startswith("prefect.")]


os.register_at_fork(after_in_child=_drop_prefect_exit_hooks_in_child)


def pytest_xdist_auto_num_workers(config):
    """One pytest-xdist worker per core, at most MAX_WORKERS: most tests spend their time in one DVC stage's
    subprocess (one core), and a worker per core keeps the machine busy."""
    return max(1, min(MAX_WORKERS, len(os.sched_getaffinity(0))))


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


@pytest.fixture(autouse=True, scope="module")
def _torch_threads_restored():
    """A module that sets torch's thread count (the known-answer tests run on one thread) leaves it as it found it
    for the next module in the same worker."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
