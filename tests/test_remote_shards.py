"""Remote shards: http(s) URLs (read with curl) and `pipe:` commands, against a real local HTTP server whose
failures are real (an HTTP 500, a connection cut mid-file, a body that just stops); a failed read is retried and
no sample is delivered twice."""

import shutil
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from torch.utils.data import DataLoader

from ldm.data import webdataset
from ldm.data.webdataset import (
    SKIP_REASONS,
    SkipCounter,
    TarSamples,
    curl_command,
    image_text_pipeline,
    is_remote,
    open_shard,
)

pytestmark = pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")

RETRIES = 3


class _ShardServer(ThreadingHTTPServer):
    """Serves the files of `root`. A path's first request misbehaves according to its name:
    flaky500-* → HTTP 500; cut-* → a Content-Length for the whole file, 60% of it, then the connection closes;
    stop-* → no Content-Length, 60% of the file, a clean close (only the tar parser can tell); dead-* → always 503."""

    daemon_threads = True

    def __init__(self, root: Path):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.root, self.requests, self.lock = root, Counter(), threading.Lock()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/{name}"


class _Handler(BaseHTTPRequestHandler):
    server: _ShardServer

    def log_message(self, *args):  # quiet
        pass

    def do_GET(self):
        name = self.path.lstrip("/")
        with self.server.lock:
            self.server.requests[name] += 1
            first = self.server.requests[name] == 1
        path = self.server.root / name
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        if name.startswith("dead-") or (first and name.startswith("flaky500-")):
            self.send_error(503 if name.startswith("dead-") else 500)
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/x-tar")
        if first and name.startswith("stop-"):
            self.end_headers()
            self.wfile.write(data[: len(data) * 6 // 10])
            return
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[: len(data) * 6 // 10] if first and name.startswith("cut-") else data)


@pytest.fixture
def server(tmp_path, synthetic_shards):
    """Five copies of a 24-sample shard under the names that choose their failure, served over HTTP."""
    root = tmp_path / "www"
    root.mkdir()
    for name in ("ok-0.tar", "flaky500-0.tar", "cut-0.tar", "stop-0.tar", "dead-0.tar"):
        shutil.copy(synthetic_shards[0], root / name)
    srv = _ShardServer(root)
    thread = threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _keys_by_shard(batches) -> Counter:
    return Counter((Path(url).name, key) for b in batches for url, key in zip(b["url"], b["key"]))


def _read_all(urls, num_workers=0, retries=RETRIES):
    pipeline = image_text_pipeline(
        urls,
        16,
        8,
        resampled=False,
        shuffle_buffer=0,
        partial_batches=True,
        shard_retries=retries,
        retry_backoff=0.01,
    )
    pipeline.decode = _with_url(pipeline.decode)
    return list(DataLoader(pipeline, batch_size=None, num_workers=num_workers))


class _with_url:
    """Keeps the shard URL of each decoded sample, to check which shard delivered what."""

    def __init__(self, decode):
        self.decode = decode

    def __call__(self, raw, rng):
        return {**self.decode(raw, rng), "url": raw["__url__"]}


@pytest.mark.parametrize("num_workers", [0, 2])
def test_transient_failures_are_retried_and_every_sample_comes_once(server, num_workers):
    names = ["ok-0.tar", "flaky500-0.tar", "cut-0.tar", "stop-0.tar"]
    urls = [server.url(n) for n in names[:2]] + [curl_command(server.url(n)) for n in names[2:]]
    assert urls[2].startswith("pipe:curl ")
    batches = _read_all(urls, num_workers)
    delivered = _keys_by_shard(batches)
    assert set(delivered.values()) == {1}, "a sample was delivered twice"
    assert {(name, f"{i:09d}") for name in names for i in range(24)} == set(delivered)
    assert sum(int(b["n_skipped"]) for b in batches) == 0
    # each failing shard was read twice, each good one once
    assert server.requests == {"ok-0.tar": 1, "flaky500-0.tar": 2, "cut-0.tar": 2, "stop-0.tar": 2}


def test_a_shard_that_keeps_failing_is_one_tar_error_after_the_retries(server):
    batches = _read_all([server.url("dead-0.tar"), server.url("ok-0.tar")])
    assert len(_keys_by_shard(batches)) == 24
    skipped = {r: sum(int(b["skipped"][r]) for b in batches) for r in SKIP_REASONS}
    assert skipped["tar_error"] == 1 == sum(skipped.values())
    assert server.requests["dead-0.tar"] == 1 + RETRIES


def test_without_retries_a_cut_shard_delivers_its_first_part_once(server):
    counter = SkipCounter()
    samples = list(TarSamples(counter, retries=0)([{"url": server.url("stop-0.tar")}]))
    assert 0 < len(samples) < 24  # the samples before the cut, then the shard ends
    assert [s["__key__"] for s in samples] == [f"{i:09d}" for i in range(len(samples))]
    assert counter.total["tar_error"] == 1


def test_a_local_shard_is_read_once(tmp_path, synthetic_shards, monkeypatch):
    data = Path(synthetic_shards[0]).read_bytes()
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(data[: len(data) // 2])
    opened = []

    def open_and_count(url):
        opened.append(url)
        return open_shard(url)

    monkeypatch.setattr(webdataset, "open_shard", open_and_count)
    assert is_remote("pipe:cat x") and is_remote("https://h/x.tar") and is_remote("s3://b/x.tar")
    assert not is_remote(str(truncated)) and not is_remote("file:///x.tar")
    counter = SkipCounter()
    samples = list(TarSamples(counter, retries=3)([{"url": str(truncated)}]))
    assert 0 < len(samples) < 24 and counter.total["tar_error"] == 1
    assert opened == [str(truncated)]  # damage on a local disk is permanent: not retried
    # the same bytes through a pipe are retried
    opened.clear()
    list(TarSamples(SkipCounter(), retries=2, backoff=0.01)([{"url": f"pipe:cat {truncated}"}]))
    assert len(opened) == 3


def test_curl_command_quotes_the_url():
    assert curl_command("https://h/a b;rm -rf x.tar") == "pipe:curl -s -L --fail 'https://h/a b;rm -rf x.tar'"
