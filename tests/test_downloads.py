"""Checkpoint downloads (models.fetch_checkpoint, models.load_checkpoint) against misbehaving servers on 127.0.0.1.

The cache is keyed by the whole URL, a failed or unreadable download leaves no cache file, every network call has a
timeout (``IRPE_DOWNLOAD_TIMEOUT``, short here), only http(s) URLs are fetched, and local files are never deleted.
Each hanging-server case finishes in about a second.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import timm
import torch

import models
import rpe_models
from models import CheckpointError, PretrainedWeightsError
from utils import UserError

NAME = "deit_tiny_patch16_224_ctx_product_50_shared_k"
SMALL = {"img_size": 32, "num_classes": 4, "depth": 1}
TIMEOUT = "0.5"  # IRPE_DOWNLOAD_TIMEOUT for the tests of hanging servers

Behaviour = Callable[[http.server.BaseHTTPRequestHandler], None]


def load_flag_checkpoint(location: str) -> dict:
    """How main.py reads --resume, --finetune and --teacher-path: a URL is downloaded again even when cached."""
    return models.load_checkpoint(location, refresh=True, progress=False)


@dataclass
class Server:
    """A test HTTP server: files under ``root``, plus ``behaviours`` (request path -> handler function) that win."""

    url: str
    root: Path
    behaviours: dict[str, Behaviour] = field(default_factory=dict)
    requests: list[str] = field(default_factory=list)  # the path of every GET
    stop: threading.Event = field(default_factory=threading.Event)


class _Handler(http.server.SimpleHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        state: Server = self.server.state  # type: ignore[attr-defined]
        state.requests.append(self.path)
        behaviour = state.behaviours.get(self.path)
        if behaviour is not None:
            behaviour(self)
        else:
            super().do_GET()

    def log_message(self, format: str, *args) -> None:  # noqa: A002
        pass


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hub_dir: Path) -> Iterator[Server]:
    root = tmp_path / "served"
    root.mkdir()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=str(root)))
    httpd.daemon_threads = True
    state = Server(url=f"http://127.0.0.1:{httpd.server_address[1]}", root=root)
    httpd.state = state  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.setenv(var, "127.0.0.1,localhost")
    try:
        yield state
    finally:
        state.stop.set()
        httpd.shutdown()
        httpd.server_close()
        thread.join()


def _save(path: Path, epoch: int, size: int = 16) -> bytes:
    """A training-style checkpoint (``model``, ``epoch``, DeiT's ``args`` Namespace); returns its bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": {"w": torch.full((size,), float(epoch))}, "epoch": epoch, "args": argparse.Namespace()}, path)
    return path.read_bytes()


def _save_zoo_checkpoint(path: Path, seed: int) -> dict[str, torch.Tensor]:
    """A release-style ``{'model': state_dict}`` of a small build of :data:`NAME`."""
    torch.manual_seed(seed)
    state = rpe_models.create_irpe_deit(NAME, **SMALL).state_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": state}, path)
    return state


def _cache_files(hub_dir: Path) -> list[str]:
    """Every file under the download cache, relative to it (temporary files included)."""
    cache = hub_dir / "checkpoints"
    return sorted(str(p.relative_to(cache)) for p in cache.rglob("*") if p.is_file()) if cache.is_dir() else []


# ------------------------------------------------------------------------------------------------------------------
# 1. The cache is keyed by the whole URL; --resume URLs are downloaded again.


def test_same_file_name_at_two_urls_are_two_downloads(server: Server, hub_dir: Path) -> None:
    _save(server.root / "run1" / "checkpoint.pth", epoch=1)
    _save(server.root / "run2" / "checkpoint.pth", epoch=2)
    assert load_flag_checkpoint(f"{server.url}/run1/checkpoint.pth")["epoch"] == 1
    assert load_flag_checkpoint(f"{server.url}/run2/checkpoint.pth")["epoch"] == 2
    first = models.fetch_checkpoint(f"{server.url}/run1/checkpoint.pth", progress=False)
    second = models.fetch_checkpoint(f"{server.url}/run2/checkpoint.pth", progress=False)
    assert first != second and first.name == second.name == "checkpoint.pth", "the file name stays readable"


def test_zoo_mirrors_do_not_share_cached_files(server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    state_a = _save_zoo_checkpoint(server.root / "a" / f"{NAME}.pth", seed=0)
    state_b = _save_zoo_checkpoint(server.root / "b" / f"{NAME}.pth", seed=1)
    for mirror, state in (("a", state_a), ("b", state_b)):
        monkeypatch.setenv("IRPE_MODEL_ZOO_URL", f"{server.url}/{mirror}/")
        model = timm.create_model(NAME, pretrained=True, **SMALL)
        torch.testing.assert_close(model.state_dict(), state, rtol=0, atol=0)  # loaded weights: exact copies


def test_resume_url_is_downloaded_again(server: Server, hub_dir: Path) -> None:
    path = server.root / "run" / "checkpoint.pth"
    url = f"{server.url}/run/checkpoint.pth"
    _save(path, epoch=1)
    assert load_flag_checkpoint(url)["epoch"] == 1
    _save(path, epoch=2)  # the next epoch's checkpoint, written later
    assert load_flag_checkpoint(url)["epoch"] == 2
    # zoo weights (immutable releases) are used from the cache without asking the server
    count = len(server.requests)
    models.fetch_checkpoint(url, progress=False)
    assert len(server.requests) == count


def test_failed_refresh_keeps_and_names_the_earlier_copy(server: Server, hub_dir: Path) -> None:
    _save(server.root / "checkpoint.pth", epoch=1)
    url = f"{server.url}/checkpoint.pth"
    load_flag_checkpoint(url)
    server.behaviours["/checkpoint.pth"] = lambda h: h.send_error(503, "down for maintenance")
    with pytest.raises(UserError, match="503") as info:
        load_flag_checkpoint(url)
    cached = models.cached_download_path(url, hub_dir / "checkpoints")
    assert f"the copy downloaded earlier was kept (cache file: {cached})" in str(info.value) and cached.is_file()
    assert models.load_checkpoint_file(cached)["epoch"] == 1


# ------------------------------------------------------------------------------------------------------------------
# 2. Short or corrupt downloads do not stay in the cache; a retry after the server is fixed works.


def _short_body(data: bytes) -> Behaviour:
    def send(handler: http.server.BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data[: len(data) // 3])
        handler.close_connection = True

    return send


@pytest.mark.parametrize("damage", ["short body", "garbage", "truncated file"])
def test_bad_download_is_not_cached_and_retry_works(server: Server, hub_dir: Path, damage: str) -> None:
    path = server.root / "ckpt.pth"
    data = _save(path, epoch=3, size=4096)
    url = f"{server.url}/ckpt.pth"
    if damage == "short body":
        server.behaviours["/ckpt.pth"] = _short_body(data)
    else:
        path.write_bytes(b"<html>not a checkpoint</html>" if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(PretrainedWeightsError) as info:
        load_flag_checkpoint(url)
    message = str(info.value)
    assert "not a readable checkpoint" in message and "has been deleted" in message and url in message
    assert str(models.cached_download_path(url, hub_dir / "checkpoints")) in message
    assert _cache_files(hub_dir) == [], "nothing cached, no temporary file left behind"
    server.behaviours.clear()  # the server is fixed
    path.write_bytes(data)
    assert load_flag_checkpoint(url)["epoch"] == 3


def test_corrupted_cached_download_is_deleted_and_fetched_again(
    server: Server, hub_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = _save_zoo_checkpoint(server.root / "zoo" / f"{NAME}.pth", seed=0)
    monkeypatch.setenv("IRPE_MODEL_ZOO_URL", f"{server.url}/zoo/")
    timm.create_model(NAME, pretrained=True, **SMALL)
    cached = models.cached_download_path(f"{server.url}/zoo/{NAME}.pth", hub_dir / "checkpoints")
    cached.write_bytes(cached.read_bytes()[:100])  # damaged on disk after the download
    with pytest.raises(PretrainedWeightsError, match="cached download .* has been deleted") as info:
        timm.create_model(NAME, pretrained=True, **SMALL)
    assert str(cached) in str(info.value) and not cached.exists()
    torch.testing.assert_close(timm.create_model(NAME, pretrained=True, **SMALL).state_dict(), state, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------------------------
# 3. Nothing hangs: timeouts, http(s) only.


def _headers_then_silence(handler: http.server.BaseHTTPRequestHandler) -> None:
    handler.send_response(200)
    handler.send_header("Content-Length", "1000")
    handler.end_headers()
    handler.wfile.flush()
    handler.server.state.stop.wait(30)  # type: ignore[attr-defined]


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts connections (the kernel's backlog) and never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


@pytest.mark.parametrize("entry", ["flag", "zoo"])
@pytest.mark.parametrize("kind", ["never answers", "headers then silence"])
def test_hanging_server_times_out(
    server: Server, silent_port: int, hub_dir: Path, monkeypatch: pytest.MonkeyPatch, kind: str, entry: str
) -> None:
    monkeypatch.setenv("IRPE_DOWNLOAD_TIMEOUT", TIMEOUT)
    if kind == "headers then silence":
        server.behaviours[f"/zoo/{NAME}.pth"] = _headers_then_silence
    prefix = f"http://127.0.0.1:{silent_port}/zoo/" if kind == "never answers" else f"{server.url}/zoo/"
    url = f"{prefix}{NAME}.pth"
    start = time.monotonic()
    if entry == "zoo":
        monkeypatch.setenv("IRPE_MODEL_ZOO_URL", prefix)
        with pytest.raises(PretrainedWeightsError) as info:
            timm.create_model(NAME, pretrained=True, **SMALL)
    else:
        with pytest.raises(UserError) as info:
            load_flag_checkpoint(url)
    assert time.monotonic() - start < 10
    message = str(info.value)
    assert url in message and "timeout 0.5 s" in message and "IRPE_DOWNLOAD_TIMEOUT" in message
    assert str(models.cached_download_path(url, hub_dir / "checkpoints")) in message
    assert _cache_files(hub_dir) == [] and socket.getdefaulttimeout() is None, "no process-wide timeout"


@pytest.mark.parametrize("url", ["ftp://127.0.0.1:21/zoo/", "s3://bucket/zoo/", "HTTPX://host/zoo/"])
def test_other_url_schemes_are_refused_up_front(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(UserError, match="only http:// and https:// URLs are downloaded"):
        load_flag_checkpoint(url + "checkpoint.pth")
    monkeypatch.setenv("IRPE_MODEL_ZOO_URL", url)
    with pytest.raises(PretrainedWeightsError, match="only http:// and https://"):
        timm.create_model(NAME, pretrained=True, **SMALL)


@pytest.mark.parametrize("value", ["0", "-1", "soon", "nan", "inf"])
def test_bad_timeout_setting(value: str, server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IRPE_DOWNLOAD_TIMEOUT", value)
    with pytest.raises(UserError, match="IRPE_DOWNLOAD_TIMEOUT=.* must be a positive number of seconds"):
        load_flag_checkpoint(f"{server.url}/checkpoint.pth")


# ------------------------------------------------------------------------------------------------------------------
# 4. Local files are the user's only copy: never deleted, never "fetched again".


@pytest.mark.parametrize("given", ["path", "file URL", "zoo directory"])
def test_truncated_local_checkpoint_is_left_alone(
    tmp_path: Path, hub_dir: Path, monkeypatch: pytest.MonkeyPatch, given: str
) -> None:
    path = tmp_path / "local_zoo" / f"{NAME}.pth"
    _save_zoo_checkpoint(path, seed=0)
    damaged = path.read_bytes()[:1000]
    path.write_bytes(damaged)
    if given == "zoo directory":
        monkeypatch.setenv("IRPE_MODEL_ZOO_URL", str(path.parent))
        with pytest.raises(PretrainedWeightsError) as info:
            timm.create_model(NAME, pretrained=True, **SMALL)
    else:
        with pytest.raises(UserError) as info:
            load_flag_checkpoint(path.as_uri() if given == "file URL" else str(path))
    message = str(info.value)
    assert f"{path} is not a readable checkpoint" in message and "left as it is" in message
    assert "delete" not in message and "fetched again" not in message
    assert path.read_bytes() == damaged and _cache_files(hub_dir) == []


# ------------------------------------------------------------------------------------------------------------------
# 5. main.py's checkpoints: the same fetch path, one-line errors of the one checkpoint error type.


def test_load_checkpoint_reads_files_and_file_urls(tmp_path: Path) -> None:
    _save(tmp_path / "ckpt.pth", epoch=7)
    assert load_flag_checkpoint(str(tmp_path / "ckpt.pth"))["epoch"] == 7
    assert load_flag_checkpoint((tmp_path / "ckpt.pth").as_uri())["epoch"] == 7


@pytest.mark.parametrize("case", ["missing file", "404", "not a dict", "unsafe pickle"])
def test_load_checkpoint_failures_are_one_line_user_errors(server: Server, tmp_path: Path, case: str) -> None:
    if case == "missing file":
        source, expected = str(tmp_path / "nope.pth"), "no checkpoint file at"
    elif case == "404":
        source, expected = f"{server.url}/nope.pth", "HTTP Error 404"
    elif case == "not a dict":
        torch.save([1, 2], server.root / "list.pth")
        source, expected = f"{server.url}/list.pth", "is not a dict"
    else:
        torch.save({"model": {}, "fn": functools.partial(print)}, tmp_path / "unsafe.pth")
        source, expected = str(tmp_path / "unsafe.pth"), "Unsupported global"
    with pytest.raises(CheckpointError, match=expected) as info:
        load_flag_checkpoint(source)
    assert isinstance(info.value, UserError) and CheckpointError is PretrainedWeightsError, "one error type"
    assert "\n" not in str(info.value) and source in str(info.value)
