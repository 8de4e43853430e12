"""stages.datasets.download against a real HTTP server on 127.0.0.1 whose answers each test scripts per path."""
from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from stages.datasets.download import DownloadConfig, Item, Result, fetch, fetch_all, part_path, write_report
from stages.common.params import ParamsError, parse

DATA = bytes(range(256)) * 800  # 200 KiB, every byte position distinguishable modulo 256
BIG = bytes(range(251)) * 12_000  # ~2.9 MiB: more than the 1 MiB chunks the downloader writes


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def config(**overrides) -> DownloadConfig:
    values = {"workers": 4, "retries": 2, "backoff_seconds": 0.0, "timeout_seconds": 5.0, **overrides}
    return DownloadConfig(**values)


# --- What the server answers: each behaviour writes one response through the request handler. ---

def serve(data: bytes):
    """A well-behaved file server: honours `Range: bytes=N-` with 206, or 416 past the end."""
    def behaviour(handler):
        start = handler.range_start()
        if start is None:
            handler.reply(200, data)
        elif start >= len(data):
            handler.reply(416, b"", {"Content-Range": f"bytes */{len(data)}"})
        else:
            handler.reply(206, data[start:], {"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"})
    return behaviour


def serve_ignoring_range(data: bytes):
    return lambda handler: handler.reply(200, data)


def status(code: int):
    return lambda handler: handler.reply(code, b"")


def drop_after(data: bytes, sent: int):
    """Announce the whole file, send its first `sent` bytes, then close the socket."""
    def behaviour(handler):
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data[:sent])
        handler.wfile.flush()
        handler.connection.shutdown(socket.SHUT_RDWR)
    return behaviour


def stall(seconds: float):
    return lambda handler: time.sleep(seconds)


class FakeServer:
    """Per path, a script of behaviours used in turn; the last one repeats. Logs every request."""

    def __init__(self):
        self.base_url = ""
        self.scripts: dict[str, list] = {}
        self.log: list[tuple[str, str | None]] = []  # (path, Range header)
        self.lock = threading.Lock()

    def route(self, path: str, *behaviours) -> str:
        self.scripts[path] = list(behaviours)
        return self.base_url + path

    def next_behaviour(self, path: str, range_header: str | None):
        with self.lock:
            self.log.append((path, range_header))
            script = self.scripts.get(path)
            if not script:
                return status(404)
            return script.pop(0) if len(script) > 1 else script[0]

    def ranges(self, path: str) -> list[str | None]:
        return [r for p, r in self.log if p == path]

    def paths(self) -> list[str]:
        return [p for p, _ in self.log]


class ScriptedHandler(BaseHTTPRequestHandler):
    def do_GET(self):
        self.server.fake.next_behaviour(self.path, self.headers.get("Range"))(self)

    def range_start(self) -> int | None:
        value = self.headers.get("Range")
        return int(value.removeprefix("bytes=").rstrip("-")) if value else None

    def reply(self, code: int, body: bytes, headers: dict | None = None):
        self.send_response(code)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # broken pipes from dropped or timed-out connections are what the tests provoke


@pytest.fixture
def server():
    fake = FakeServer()
    httpd = QuietServer(("127.0.0.1", 0), ScriptedHandler)
    httpd.fake = fake
    fake.base_url = f"http://127.0.0.1:{httpd.server_port}"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    yield fake
    httpd.shutdown()
    httpd.server_close()
    thread.join()


# --- One item ---

def test_download_is_verified_and_renamed_into_place(server, tmp_path):
    url = server.route("/a.bin", serve(DATA))
    dest = tmp_path / "deep" / "dir" / "a.bin"
    result = fetch(Item(url, dest, sha256=sha256(DATA), size=len(DATA)), config())
    assert (result.status, result.error, result.bytes) == ("downloaded", "", len(DATA))
    assert dest.read_bytes() == DATA
    assert not part_path(dest).exists()


@pytest.mark.parametrize("check,message", [
    ({"sha256": sha256(b"something else")}, "sha256"),
    ({"size": len(DATA) + 1}, "size"),
])
def test_a_mismatch_is_failed_and_leaves_no_file(server, tmp_path, check, message):
    url = server.route("/a.bin", serve(DATA))
    dest = tmp_path / "a.bin"
    result = fetch(Item(url, dest, **check), config())
    assert result.status == "failed" and message in result.error
    assert list(tmp_path.iterdir()) == []


def test_a_dropped_connection_leaves_a_part_that_the_next_run_resumes(server, tmp_path):
    dropped_at = 2_500_000
    url = server.route("/big.bin", drop_after(BIG, dropped_at), serve(BIG))
    item = Item(url, tmp_path / "big.bin", sha256=sha256(BIG))

    first = fetch(item, config(retries=0))
    assert first.status == "failed" and "connection lost" in first.error
    assert not item.dest.exists()
    # The part holds every whole 1 MiB chunk received; the chunk cut short by the drop is lost.
    kept = part_path(item.dest).stat().st_size
    assert 0 < kept <= dropped_at
    assert part_path(item.dest).read_bytes() == BIG[:kept]

    second = fetch(item, config(retries=0))
    assert second.status == "downloaded"
    assert server.ranges("/big.bin") == [None, f"bytes={kept}-"]
    assert item.dest.read_bytes() == BIG


def test_a_dropped_connection_is_resumed_by_the_next_attempt(server, tmp_path):
    url = server.route("/big.bin", drop_after(BIG, 1_500_000), serve(BIG))
    result = fetch(Item(url, tmp_path / "big.bin", sha256=sha256(BIG)), config(retries=1))
    assert result.status == "downloaded"
    first, second = server.ranges("/big.bin")
    assert first is None and second.startswith("bytes=") and second != "bytes=0-"
    assert (tmp_path / "big.bin").read_bytes() == BIG


def test_a_server_error_on_resume_keeps_the_part(server, tmp_path):
    url = server.route("/a.bin", status(503), serve(DATA))
    dest = tmp_path / "a.bin"
    part_path(dest).write_bytes(DATA[:1000])
    result = fetch(Item(url, dest, sha256=sha256(DATA)), config(retries=1))
    assert result.status == "downloaded"
    assert server.ranges("/a.bin") == ["bytes=1000-", "bytes=1000-"]
    assert dest.read_bytes() == DATA


def test_a_server_without_range_support_restarts_from_zero(server, tmp_path):
    url = server.route("/a.bin", serve_ignoring_range(DATA))
    dest = tmp_path / "a.bin"
    part_path(dest).write_bytes(b"x" * 500)  # not even a prefix of DATA: it must be overwritten
    result = fetch(Item(url, dest, sha256=sha256(DATA)), config())
    assert result.status == "downloaded"
    assert server.ranges("/a.bin") == ["bytes=500-"]
    assert dest.read_bytes() == DATA


def test_a_complete_part_answered_with_416_is_verified_without_a_body(server, tmp_path):
    url = server.route("/a.bin", serve(DATA))
    dest = tmp_path / "a.bin"
    part_path(dest).write_bytes(DATA)
    result = fetch(Item(url, dest, sha256=sha256(DATA)), config())
    assert result.status == "downloaded"
    assert server.ranges("/a.bin") == [f"bytes={len(DATA)}-"]
    assert dest.read_bytes() == DATA


def test_a_part_longer_than_the_file_is_discarded(server, tmp_path):
    url = server.route("/a.bin", serve(DATA))
    dest = tmp_path / "a.bin"
    part_path(dest).write_bytes(DATA + b"stale tail")
    result = fetch(Item(url, dest), config())
    assert result.status == "downloaded"
    assert server.ranges("/a.bin") == [f"bytes={len(DATA) + 10}-", None]
    assert dest.read_bytes() == DATA


@pytest.mark.parametrize("code", [500, 503, 429])
def test_a_retryable_error_then_success_is_retried(server, tmp_path, code):
    url = server.route("/a.bin", status(code), serve(DATA))
    result = fetch(Item(url, tmp_path / "a.bin"), config(retries=2, backoff_seconds=0.01))
    assert result.status == "downloaded"
    assert len(server.ranges("/a.bin")) == 2


@pytest.mark.parametrize("code", [404, 410])
def test_a_dead_url_is_missing_without_retry(server, tmp_path, code):
    url = server.route("/gone.bin", status(code))
    result = fetch(Item(url, tmp_path / "gone.bin"), config(retries=3))
    assert result.status == "missing" and str(code) in result.error
    assert len(server.ranges("/gone.bin")) == 1
    assert list(tmp_path.iterdir()) == []


def test_another_4xx_fails_without_retry(server, tmp_path):
    url = server.route("/secret.bin", status(403))
    result = fetch(Item(url, tmp_path / "secret.bin"), config(retries=3))
    assert result.status == "failed" and "403" in result.error
    assert len(server.ranges("/secret.bin")) == 1


def test_5xx_forever_fails_after_retries_plus_one_attempts(server, tmp_path):
    url = server.route("/busy.bin", status(503))
    result = fetch(Item(url, tmp_path / "busy.bin"), config(retries=2, backoff_seconds=0.01))
    assert result.status == "failed"
    assert "503" in result.error and "3 attempt" in result.error
    assert len(server.ranges("/busy.bin")) == 3


def test_a_timeout_is_retried(server, tmp_path):
    url = server.route("/slow.bin", stall(1.0), serve(DATA))
    result = fetch(Item(url, tmp_path / "slow.bin"), config(retries=1, timeout_seconds=0.2))
    assert result.status == "downloaded"
    assert len(server.ranges("/slow.bin")) == 2


def test_connection_refused_fails_after_retries(tmp_path):
    with socket.socket() as s:  # a port that nothing listens on once this socket closes
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = fetch(Item(f"http://127.0.0.1:{port}/a.bin", tmp_path / "a.bin"), config(retries=1))
    assert result.status == "failed" and "ConnectionError" in result.error


def test_a_non_http_url_fails_instead_of_raising(tmp_path):
    result = fetch(Item("ftp://example.invalid/a.bin", tmp_path / "a.bin"), config())
    assert result.status == "failed" and "InvalidSchema" in result.error


def test_a_present_file_is_cached_without_any_request(server, tmp_path):
    url = server.route("/a.bin", serve(DATA))
    dest = tmp_path / "a.bin"
    dest.write_bytes(DATA)
    assert fetch(Item(url, dest), config()).status == "cached"
    assert fetch(Item(url, dest, sha256=sha256(DATA), size=len(DATA)), config()).status == "cached"
    assert server.log == []


def test_a_present_file_failing_its_checksum_is_fetched_again(server, tmp_path):
    url = server.route("/a.bin", serve(DATA))
    dest = tmp_path / "a.bin"
    dest.write_bytes(b"corrupt")
    result = fetch(Item(url, dest, sha256=sha256(DATA)), config())
    assert result.status == "downloaded"
    assert dest.read_bytes() == DATA


# --- Many items ---

def test_an_interrupted_run_restarted_fetches_only_what_is_missing(server, tmp_path, capsys):
    refused = {"/2.bin", "/4.bin"}
    items = []
    for i in range(5):
        path = f"/{i}.bin"
        body = DATA[i:] + bytes([i])
        behaviours = (status(503), serve(body)) if path in refused else (serve(body),)
        items.append(Item(server.route(path, *behaviours), tmp_path / "files" / f"{i}.bin", sha256=sha256(body)))

    first = fetch_all(items, config(retries=0), desc="first")
    assert [r.item for r in first] == items
    assert [r.status for r in first] == ["downloaded", "downloaded", "failed", "downloaded", "failed"]
    assert "first: 3 downloaded, 0 cached, 0 missing, 2 failed" in capsys.readouterr().out

    server.log.clear()
    second = fetch_all(items, config(retries=0), desc="second")
    assert [r.status for r in second] == ["cached", "cached", "downloaded", "cached", "downloaded"]
    assert sorted(server.paths()) == sorted(refused)
    assert "second: 2 downloaded, 3 cached, 0 missing, 0 failed" in capsys.readouterr().out
    for i, item in enumerate(items):
        assert item.dest.read_bytes() == DATA[i:] + bytes([i])


def test_fetch_all_rejects_two_items_with_one_destination(tmp_path):
    items = [Item("http://127.0.0.1/a", tmp_path / "x"), Item("http://127.0.0.1/b", tmp_path / "x")]
    with pytest.raises(ValueError, match="share the destination"):
        fetch_all(items, config())


def test_write_report_counts_statuses_and_lists_the_problems(tmp_path):
    def result(name: str, status: str, error: str = "") -> Result:
        return Result(Item(f"http://host/{name}", tmp_path / name), status, error)

    results = [result("a", "downloaded"), result("b", "cached"), result("c", "cached"),
               result("d", "missing", "HTTP 404 Not Found"), result("e", "failed", "sha256 mismatch")]
    report = write_report(tmp_path / "reports" / "download.json", results)
    assert report == {
        "total": 5,
        "counts": {"downloaded": 1, "cached": 2, "missing": 1, "failed": 1},
        "problems": [
            {"url": "http://host/d", "dest": str(tmp_path / "d"), "status": "missing", "error": "HTTP 404 Not Found"},
            {"url": "http://host/e", "dest": str(tmp_path / "e"), "status": "failed", "error": "sha256 mismatch"},
        ],
    }
    assert json.loads((tmp_path / "reports" / "download.json").read_text()) == report


# --- params.yaml section ---

GOOD_PARAMS = {"workers": 8, "retries": 3, "backoff_seconds": 1.0, "timeout_seconds": 30.0}


def test_good_params_parse():
    assert parse(DownloadConfig, "download", GOOD_PARAMS) == DownloadConfig(**GOOD_PARAMS)
    assert parse(DownloadConfig, "download", {**GOOD_PARAMS, "retries": 0, "backoff_seconds": 0}).retries == 0


@pytest.mark.parametrize("change,message", [
    ({"workers": 0}, r"download\.workers: Input should be greater than 0"),
    ({"workers": "4"}, r"download\.workers: Input should be a valid integer"),
    ({"retries": -1}, r"download\.retries: Input should be greater than or equal to 0"),
    ({"backoff_seconds": -0.5}, r"download\.backoff_seconds: Input should be greater than or equal to 0"),
    ({"timeout_seconds": 0}, r"download\.timeout_seconds: Input should be greater than 0"),
    ({"threads": 4}, r"download\.threads: unknown key"),
])
def test_bad_params_name_the_key(change, message):
    with pytest.raises(ParamsError, match=message):
        parse(DownloadConfig, "download", {**GOOD_PARAMS, **change})
