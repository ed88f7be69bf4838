"""Shards served over HTTP (a local server on 127.0.0.1) and ``pipe:`` commands: they stream like local shards,
resume at the same batch, survive transient failures through bounded retries, and a shard that keeps failing is
reported with its URL."""

from __future__ import annotations

import functools
import threading
from collections import Counter
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest

from codetr.data.format import DataError
from codetr.data.loader import DataSourceConfig, build_loader
from codetr.data.remote import RemoteOptions, ShardFetchError, fetch_bytes
from codetr.data.shards import resolve_shards

FAST = RemoteOptions(retries=2, backoff_s=0.0, timeout_s=10.0)


class _FlakyHandler(SimpleHTTPRequestHandler):
    """Static files with injected faults: ``fail[path] = n`` answers 503 n times, ``cut[path] = n`` sends half the
    body with the full Content-Length n times, ``missing`` paths answer 404."""

    fail: Counter = Counter()
    cut: Counter = Counter()
    missing: set = set()
    requests: Counter = Counter()

    def log_message(self, *args) -> None:  # keep the test output clean
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server API
        path = self.path.lstrip("/")
        type(self).requests[path] += 1
        if path in self.missing:
            self.send_error(404, "gone")
            return
        if self.fail[path] > 0:
            type(self).fail[path] -= 1
            self.send_error(503, "busy")
            return
        if self.cut[path] > 0:
            type(self).cut[path] -= 1
            data = (self.server.root / path).read_bytes()  # type: ignore[attr-defined]
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        super().do_GET()


@pytest.fixture()
def server(shard_dir):
    _FlakyHandler.fail, _FlakyHandler.cut, _FlakyHandler.requests = Counter(), Counter(), Counter()
    _FlakyHandler.missing = set()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_FlakyHandler, directory=str(shard_dir)))
    httpd.root = shard_dir
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", _FlakyHandler
    httpd.shutdown()
    httpd.server_close()


def _cfg(source: str, **kw) -> dict:
    return {"shards": source, "batch_size": 3, "num_workers": 0, "shuffle_buffer": 6, "transforms": {"kind": "none"},
            "retries": 2, "retry_backoff_s": 0.0, **kw}


def _sig(batch):
    return tuple(batch.image_ids), round(float(batch.images.sum()), 2), tuple(batch.images.shape)


def test_remote_index_resolves_like_the_local_one(server, shard_dir):
    base, _ = server
    remote = resolve_shards(f"{base}/index.json", remote=FAST)
    local = resolve_shards(shard_dir)
    assert remote.sizes == local.sizes and remote.info.categories == local.info.categories
    assert [u.rsplit("/", 1)[1] for u in remote.urls] == [u.rsplit("/", 1)[1] for u in local.urls]
    assert all(u.startswith(base + "/") for u in remote.urls)


@pytest.mark.parametrize("split", ["train", "val"])
def test_http_shards_stream_and_resume_like_local_shards(server, shard_dir, split):
    base, _ = server

    def make(source):
        loader = build_loader(_cfg(source), split, rank=0, world_size=1, seed=3)
        loader.set_epoch(1)
        return loader

    local = [_sig(b) for b in make(str(shard_dir))]
    remote_loader = make(f"{base}/index.json")
    it = iter(remote_loader)
    head = [_sig(next(it)) for _ in range(2)]
    state = remote_loader.state_dict()
    assert head + [_sig(b) for b in it] == local
    resumed = make(f"{base}/index.json")
    resumed.load_state_dict(state)
    assert [_sig(b) for b in resumed] == local[2:]


def test_transient_failures_are_retried(server, shard_dir):
    base, handler = server
    handler.fail["shard-000002.tar"] = 2  # 503 twice, then served
    handler.cut["shard-000004.tar"] = 1  # body cut in half once
    loader = build_loader(_cfg(f"{base}/index.json"), "val", rank=0, world_size=1)
    ids = sorted(i for b in loader for i in b.image_ids if i >= 0)
    assert len(ids) == 26
    assert handler.requests["shard-000002.tar"] == 3 and handler.requests["shard-000004.tar"] == 2


def test_a_shard_that_keeps_failing_is_reported_with_its_url(server):
    base, handler = server
    handler.fail["shard-000003.tar"] = 100
    loader = build_loader(_cfg(f"{base}/index.json", retries=1), "val", rank=0, world_size=1)
    with pytest.raises(DataError, match=r"shard-000003\.tar: failed after 2 attempts, last error: .*503"):
        list(loader)
    assert handler.requests["shard-000003.tar"] == 2


def test_not_found_is_not_retried(server):
    base, handler = server
    handler.missing.add("shard-000001.tar")
    with pytest.raises(ShardFetchError, match=r"shard-000001\.tar: HTTP 404 .*not retried"):
        fetch_bytes(f"{base}/shard-000001.tar", FAST)
    assert handler.requests["shard-000001.tar"] == 1
    with pytest.raises(ShardFetchError, match="index.json"):
        handler.missing.add("index.json")
        resolve_shards(f"{base}/index.json", remote=FAST)


def test_failing_pipe_command_is_retried_then_named(shard_dir, tmp_path):
    attempts = tmp_path / "attempts"
    flaky = f"pipe:echo x >> {attempts}; test $(wc -l < {attempts}) -ge 2 && cat {shard_dir}/shard-000000.tar"
    assert fetch_bytes(flaky, FAST)[:4]  # second attempt succeeds
    assert attempts.read_text().count("x") == 2
    with pytest.raises(ShardFetchError, match=r"pipe:exit 3: failed after 3 attempts, last error: exit status 3"):
        fetch_bytes("pipe:exit 3", FAST)


def test_retry_options_are_validated():
    with pytest.raises(ValueError, match="retries"):
        DataSourceConfig.model_validate(_cfg("http://x/index.json", retries=-1))
    with pytest.raises(DataError, match="remote shard options"):
        RemoteOptions(retries=1, backoff_s=0.0, timeout_s=0.0)
