"""Pretrained weights through torch.hub's cache (served on 127.0.0.1), local mirrors, errors, torch.hub.load."""

from __future__ import annotations

import functools
import hashlib
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import timm
import torch

import models
import rpe_models
from models import NoReleasedWeightsError, PretrainedWeightsError

REPO_ROOT = Path(__file__).resolve().parents[1]
NAME = "deit_tiny_patch16_224_ctx_product_50_shared_k"
SMALL = {"img_size": 32, "num_classes": 4, "depth": 1}  # a small stand-in for the 224/1000-class release
# timm's DeiT release models, which hubconf.py lists beside the iRPE models.
DEIT_BASELINES = [
    "deit_tiny_patch16_224",
    "deit_small_patch16_224",
    "deit_base_patch16_224",
    "deit_tiny_distilled_patch16_224",
    "deit_small_distilled_patch16_224",
    "deit_base_distilled_patch16_224",
    "deit_base_patch16_384",
    "deit_base_distilled_patch16_384",
]


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args) -> None:  # noqa: A002
        pass


@pytest.fixture
def mirror(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Path]]:
    """An HTTP server on 127.0.0.1 serving ``tmp_path/served``; yields ``(url prefix, directory)``."""
    served = tmp_path / "served"
    served.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=served))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.setenv(var, "127.0.0.1,localhost")
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/zoo/", served
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _write_checkpoint(path: Path, name: str = NAME, seed: int = 0) -> dict[str, torch.Tensor]:
    """A release-style checkpoint ``{'model': state_dict}`` of a small build of ``name`` with non-zero tables."""
    torch.manual_seed(seed)
    model = rpe_models.create_irpe_deit(name, **SMALL)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lookup_table" in n:
                p.normal_()
    state = model.state_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": state, "epoch": 299}, path)
    return state


def _cached_files(hub_dir: Path) -> list[Path]:
    return [path for path in (hub_dir / "checkpoints").rglob("*") if path.is_file()]


def _assert_loaded(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    for key, value in model.state_dict().items():  # loaded weights: exact copies
        torch.testing.assert_close(value, state[key], rtol=0, atol=0, msg=key)


def test_download_through_hub_cache(mirror, hub_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url, served = mirror
    state = _write_checkpoint(served / "zoo" / f"{NAME}.pth")
    monkeypatch.setenv("IRPE_MODEL_ZOO_URL", url)
    model = timm.create_model(NAME, pretrained=True, **SMALL)
    _assert_loaded(model, state)
    cached = models.cached_download_path(f"{url}{NAME}.pth", hub_dir / "checkpoints")
    assert cached.is_file() and cached.name == f"{NAME}.pth" and cached.parent.parent == hub_dir / "checkpoints"
    # a second build reads the cache: it works with the mirror gone
    (served / "zoo" / f"{NAME}.pth").unlink()
    _assert_loaded(timm.create_model(NAME, pretrained=True, **SMALL), state)


def test_timm_cache_dir_and_hub_load(mirror, hub_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url, served = mirror
    state = _write_checkpoint(served / "zoo" / f"{NAME}.pth")
    monkeypatch.setenv("IRPE_MODEL_ZOO_URL", url)
    model = timm.create_model(NAME, pretrained=True, cache_dir=tmp_path / "timm_cache", **SMALL)
    _assert_loaded(model, state)
    assert models.cached_download_path(f"{url}{NAME}.pth", tmp_path / "timm_cache").is_file()
    hub_model = torch.hub.load(str(REPO_ROOT), NAME, source="local", pretrained=True, verbose=False, **SMALL)
    _assert_loaded(hub_model, state)


def test_local_directory_mirror(tmp_path: Path, hub_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = _write_checkpoint(tmp_path / "local_zoo" / f"{NAME}.pth")
    monkeypatch.setenv("IRPE_MODEL_ZOO_URL", str(tmp_path / "local_zoo"))
    _assert_loaded(timm.create_model(NAME, pretrained=True, **SMALL), state)
    assert not (hub_dir / "checkpoints").exists(), "a local mirror is read in place"


def test_adapts_resolution_and_classes(tmp_path: Path, hub_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkpoint built at 32/4 classes loads into a 48x48, 7-class build: pos_embed resampled, head fresh."""
    state = _write_checkpoint(tmp_path / "local_zoo" / f"{NAME}.pth")
    monkeypatch.setenv("IRPE_MODEL_ZOO_URL", str(tmp_path / "local_zoo"))
    model = timm.create_model(NAME, pretrained=True, img_size=48, num_classes=7, depth=1)
    torch.testing.assert_close(  # loaded weights: exact copies
        model.blocks[0].attn.rpe_k.lookup_table_weight, state["blocks.0.attn.rpe_k.lookup_table_weight"], rtol=0, atol=0
    )
    assert model.pos_embed.shape == (1, 1 + 9, 192) and model.head.weight.shape == (7, 192)
    assert model(torch.randn(1, 3, 48, 48)).shape == (1, 7)


def test_missing_checkpoint_404(mirror, hub_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url, _ = mirror
    monkeypatch.setenv("IRPE_MODEL_ZOO_URL", url)
    with pytest.raises(PretrainedWeightsError) as info:
        timm.create_model(NAME, pretrained=True, **SMALL)
    message = str(info.value)
    assert f"{url}{NAME}.pth" in message and "404" in message
    assert str(models.cached_download_path(f"{url}{NAME}.pth", hub_dir / "checkpoints")) in message
    assert "nothing was cached" in message and "--resume" in message
    assert not _cached_files(hub_dir), "a failed download leaves no file behind"


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_broken_checkpoint(mirror, hub_dir: Path, monkeypatch: pytest.MonkeyPatch, damage: str) -> None:
    url, served = mirror
    path = served / "zoo" / f"{NAME}.pth"
    _write_checkpoint(path)
    data = path.read_bytes()
    path.write_bytes(b"<html>not a checkpoint</html>" if damage == "garbage" else data[: len(data) // 2])
    monkeypatch.setenv("IRPE_MODEL_ZOO_URL", url)
    with pytest.raises(PretrainedWeightsError, match="not a readable checkpoint") as info:
        timm.create_model(NAME, pretrained=True, **SMALL)
    cached = models.cached_download_path(f"{url}{NAME}.pth", hub_dir / "checkpoints")
    assert f"{cached} is not a readable checkpoint" in str(info.value) and "has been deleted" in str(info.value)
    assert "--resume" in str(info.value) and not _cached_files(hub_dir), "the bad download is not kept"


def test_structural_mismatch_lists_keys(tmp_path: Path, hub_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "local_zoo" / f"{NAME}.pth"
    state = _write_checkpoint(path)
    del state["blocks.0.attn.rpe_k.lookup_table_weight"]
    state["blocks.0.attn.rpe_v.lookup_table_weight"] = torch.zeros(1, 50, 64)
    state["blocks.0.attn.qkv.weight"] = torch.zeros(3, 3)
    torch.save({"model": state}, path)
    monkeypatch.setenv("IRPE_MODEL_ZOO_URL", str(tmp_path / "local_zoo"))
    with pytest.raises(PretrainedWeightsError) as info:
        timm.create_model(NAME, pretrained=True, **SMALL)
    message = str(info.value)
    assert "missing keys (1): blocks.0.attn.rpe_k.lookup_table_weight" in message
    assert "unexpected keys (1): blocks.0.attn.rpe_v.lookup_table_weight" in message
    assert "shapes differ (1): blocks.0.attn.qkv.weight: checkpoint (3, 3) vs model (576, 192)" in message


def test_model_without_release() -> None:
    name = "deit_small_patch16_224_ctx_euc_20_shared_k"
    assert not rpe_models.MODEL_ZOO[name].released
    with pytest.raises(NoReleasedWeightsError, match="no released checkpoint") as info:
        timm.create_model(name, pretrained=True)
    assert isinstance(info.value, ValueError) and "--resume" in str(info.value)


def test_bad_mirror_setting(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("IRPE_MODEL_ZOO_URL", str(tmp_path / "does_not_exist"))
    with pytest.raises(ValueError, match="IRPE_MODEL_ZOO_URL"):
        timm.create_model(NAME, pretrained=True)
    timm.create_model(NAME, pretrained=False, **SMALL)  # without pretrained the setting is not read


def test_baseline_checkpoint_and_hash(mirror, hub_dir: Path, tmp_path: Path) -> None:
    """DeiT release checkpoints carry a SHA-256 prefix in their name: checked on download."""
    url, served = mirror
    torch.manual_seed(0)
    source = timm.create_model("deit_tiny_patch16_224", **SMALL)
    path = tmp_path / "deit.pth"
    torch.save({"model": source.state_dict()}, path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:8]
    (served / "zoo").mkdir()
    (served / "zoo" / f"deit_tiny_patch16_224-{digest}.pth").write_bytes(path.read_bytes())
    (served / "zoo" / "deit_tiny_patch16_224-00000000.pth").write_bytes(path.read_bytes())

    overlay = {"file": str(path), "num_classes": SMALL["num_classes"]}  # timm keeps a head of the checkpoint's size
    model = timm.create_model("deit_tiny_patch16_224", pretrained=True, pretrained_cfg_overlay=overlay, **SMALL)
    _assert_loaded(model, source.state_dict())
    target = timm.create_model("deit_tiny_patch16_224", **SMALL)
    models.load_pretrained(target, f"{url}deit_tiny_patch16_224-{digest}.pth", check_hash=True, progress=False)
    _assert_loaded(target, source.state_dict())
    with pytest.raises(PretrainedWeightsError, match="could not download"):
        models.load_pretrained(target, f"{url}deit_tiny_patch16_224-00000000.pth", check_hash=True, progress=False)


@pytest.mark.parametrize("name", ["deit_tiny_patch16_224_ctx_product_50_shared_k", "deit_tiny_distilled_patch16_224"])
def test_torch_hub_load_local(name: str) -> None:
    model = torch.hub.load(str(REPO_ROOT), name, source="local", verbose=False, **SMALL)
    assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 4)


def test_hubconf_lists_every_model() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("hubconf_under_test", REPO_ROOT / "hubconf.py")
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)
    assert hubconf.dependencies == ["torch", "timm"]
    entries = {n for n in dir(hubconf) if callable(getattr(hubconf, n)) and not n.startswith("_")}
    assert entries == set(rpe_models.MODEL_ZOO) | set(DEIT_BASELINES)
