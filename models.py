"""Fetching, reading and verifying checkpoints: pretrained weights, and the URLs ``main.py`` is given.

http(s) checkpoints are downloaded (with timeouts, see :func:`download_checkpoint`) into torch.hub's cache
(``torch.hub.get_dir()/checkpoints``, or timm's ``cache_dir``) under a folder named by a hash of the URL, read with
``torch.load(weights_only=True)``, checked key by key and shape by shape against the model, and loaded strictly
(:func:`load_pretrained`, which :mod:`rpe_models` builds its pretrained models with; ``utils.load_checkpoint`` uses
:func:`fetch_checkpoint`). Two adaptations follow from the constructor arguments: ``pos_embed`` is resampled when the
model is built for another ``img_size``, and the classifier head(s) keep their fresh initialisation when
``num_classes`` differs from the checkpoint's.

The models themselves are registered in timm by :mod:`rpe_models` (the iRPE models); the plain DeiT baselines are
timm's own ``deit_*`` models, whose layout is the DeiT release's.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import math
import os
import re
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from contextlib import suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from timm.layers import resample_abs_pos_embed
from torch import nn

if TYPE_CHECKING:
    from rpe_vision_transformer import VisionTransformer

__all__ = [
    "NoReleasedWeightsError",
    "PretrainedWeightsError",
    "adapt_state_dict",
    "checkpoint_cache_dir",
    "fetch_checkpoint",
    "load_pretrained",
    "read_checkpoint",
    "read_state_dict",
    "state_dict_mismatch",
]

# Downloads: only these URL schemes are fetched (other URLs are refused up front; file:// URLs are local paths).
DOWNLOAD_SCHEMES = ("http", "https")
# Seconds to wait for a connection and for each read; the environment variable overrides it.
DOWNLOAD_TIMEOUT_ENV = "IRPE_DOWNLOAD_TIMEOUT"
DEFAULT_DOWNLOAD_TIMEOUT = 60.0
# Bytes per second a download must keep up over every timeout-long stretch: a trickling server fails, not hangs.
MIN_DOWNLOAD_RATE = 1024
_DOWNLOAD_CHUNK = 1 << 20


class PretrainedWeightsError(RuntimeError):
    """Pretrained weights could not be downloaded, read or matched to the model."""


class NoReleasedWeightsError(PretrainedWeightsError, ValueError):
    """``pretrained=True`` for a model that has no released checkpoint."""


# ------------------------------------------------------------------------------------------------------------------
# Fetching, reading and verifying checkpoints.
# ------------------------------------------------------------------------------------------------------------------


def checkpoint_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where downloaded checkpoints go: ``cache_dir`` if given, else ``torch.hub.get_dir()/checkpoints``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    return Path(torch.hub.get_dir()) / "checkpoints"


def is_url(location: str | os.PathLike) -> bool:
    """Whether ``location`` is a URL (``scheme://...``) rather than a file-system path."""
    return isinstance(location, str) and re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", location) is not None


def local_checkpoint_path(location: str | os.PathLike) -> Path | None:
    """The file a local ``location`` names (a path or a ``file://`` URL), or None for an http(s) URL.

    Raises:
        PretrainedWeightsError: a URL of another scheme (``ftp://``, ``s3://``, ...), refused before any connection.
    """
    if not is_url(location):
        return Path(location).expanduser()
    parts = urllib.parse.urlsplit(str(location))
    scheme = parts.scheme.lower()
    if scheme == "file":
        return Path(urllib.request.url2pathname(parts.path))
    if scheme not in DOWNLOAD_SCHEMES:
        raise PretrainedWeightsError(
            f"cannot fetch {location}: only http:// and https:// URLs are downloaded (and local paths or file:// URLs "
            f"read in place), not {scheme}://; copy the file locally and give its path"
        )
    return None


def download_timeout() -> float:
    """The download timeout in seconds: ``$IRPE_DOWNLOAD_TIMEOUT``, else :data:`DEFAULT_DOWNLOAD_TIMEOUT`.

    Raises:
        PretrainedWeightsError: the variable is set to something other than a positive number.
    """
    text = os.environ.get(DOWNLOAD_TIMEOUT_ENV, "").strip()
    if not text:
        return DEFAULT_DOWNLOAD_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (value > 0 and math.isfinite(value)):
        raise PretrainedWeightsError(f"{DOWNLOAD_TIMEOUT_ENV}={text!r} must be a positive number of seconds")
    return value


def cached_download_path(url: str, cache: Path) -> Path:
    """Where the download of ``url`` is cached: ``<cache>/<16 hex digits of SHA-256(url)>/<file name of url>``.

    The folder keys the cache by the whole URL (two runs' ``checkpoint.pth``, or two mirrors, never share a file);
    the file keeps the name it has on the server.
    """
    name = os.path.basename(urllib.parse.unquote(urllib.parse.urlsplit(url).path))
    if name in ("", ".", ".."):
        name = "checkpoint.pth"
    return cache / hashlib.sha256(url.encode()).hexdigest()[:16] / name


def _metadata_path(path: Path) -> Path:
    """The file beside a cached download that records its URL and the server's validators (ETag, Last-Modified)."""
    return path.with_name(path.name + ".json")


def _conditional_headers(path: Path) -> dict[str, str]:
    """Headers that ask the server to answer 304 if the cached ``path`` is still current; empty if unknown."""
    try:
        meta = json.loads(_metadata_path(path).read_text())
    except (OSError, ValueError):
        return {}
    headers = {}
    if isinstance(meta, dict) and meta.get("etag"):
        headers["If-None-Match"] = str(meta["etag"])
    if isinstance(meta, dict) and meta.get("last_modified"):
        headers["If-Modified-Since"] = str(meta["last_modified"])
    return headers


class _HttpRedirectsOnly(urllib.request.HTTPRedirectHandler):
    """Follows redirects to http(s) URLs only (urllib would also follow one to ``ftp://``, which has no timeouts)."""

    def redirect_request(
        self, req: urllib.request.Request, fp: Any, code: int, msg: str, headers: Any, newurl: str
    ) -> urllib.request.Request | None:
        if urllib.parse.urlsplit(newurl).scheme.lower() not in DOWNLOAD_SCHEMES:
            raise urllib.error.URLError(f"redirected to {newurl}, which is not an http(s) URL")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


class _DownloadError(Exception):
    """Why a download was abandoned (turned into a :class:`PretrainedWeightsError` naming URL, timeout and cache)."""


def _load_error_reason(err: Exception) -> str:
    """One line saying why ``torch.load`` failed (its ``weights_only`` errors span a paragraph of advice)."""
    text = str(err)
    match = re.search(r"WeightsUnpickler error: (.*?)(?: Please use|\n|$)", text)
    if match:
        return f"{type(err).__name__}: {match.group(1).strip()} (only tensors and plain data are loaded)"
    return f"{type(err).__name__}: {text.strip().splitlines()[0] if text.strip() else 'no detail'}"


def load_checkpoint_file(path: str | os.PathLike) -> Any:
    """``torch.load(path, weights_only=True)`` onto the CPU: how downloads, weights and ``utils.load_checkpoint`` read.

    Besides tensors and plain data it rebuilds only :data:`utils.CHECKPOINT_SAFE_GLOBALS` (DeiT's checkpoints hold
    their flags as an ``argparse.Namespace``).
    """
    from utils import CHECKPOINT_SAFE_GLOBALS

    with torch.serialization.safe_globals(CHECKPOINT_SAFE_GLOBALS):
        return torch.load(path, map_location="cpu", weights_only=True)


def _stream_to_file(response: Any, out: Any, *, timeout: float, digest: Any, progress: bool) -> int:
    """Copies the body of ``response`` into ``out``; returns its size.

    Every read waits at most ``timeout`` seconds (the socket's timeout), and each ``timeout``-second stretch must
    bring at least :data:`MIN_DOWNLOAD_RATE` bytes per second, so a server that stops or trickles fails the download.

    Raises:
        _DownloadError: the server sent less than its ``Content-Length`` or too slowly.
    """
    length = response.headers.get("Content-Length")
    expected = int(length) if length and length.isdigit() else None
    bar = None
    if progress:
        try:
            from tqdm import tqdm
        except ImportError:  # tqdm comes with timm's dependencies; without it there is no bar
            pass
        else:
            bar = tqdm(total=expected, unit="B", unit_scale=True, unit_divisor=1024, leave=False)
    size, window_start, window_bytes = 0, time.monotonic(), 0
    try:
        while chunk := response.read1(_DOWNLOAD_CHUNK):  # read1 returns what has arrived, without waiting for more
            out.write(chunk)
            digest.update(chunk)
            size += len(chunk)
            window_bytes += len(chunk)
            if bar is not None:
                bar.update(len(chunk))
            elapsed = time.monotonic() - window_start
            if elapsed >= timeout:
                if window_bytes < MIN_DOWNLOAD_RATE * elapsed:
                    raise _DownloadError(
                        f"stalled: {window_bytes} bytes in the last {elapsed:.1f} s, below the minimum of "
                        f"{MIN_DOWNLOAD_RATE} bytes/s"
                    )
                window_start, window_bytes = time.monotonic(), 0
    finally:
        if bar is not None:
            bar.close()
    if expected is not None and size != expected:
        raise _DownloadError(f"incomplete: received {size} of the {expected} bytes the server announced")
    return size


def download_checkpoint(
    url: str, path: Path, *, hash_prefix: str | None = None, progress: bool = True, revalidate: bool = False
) -> Path:
    """Downloads ``url`` to ``path`` (atomically), or keeps ``path`` if it is cached and, when asked, still current.

    The body goes to a temporary file beside ``path`` that becomes ``path`` only when it has the announced length,
    the SHA-256 prefix (if given) and loads with :func:`load_checkpoint_file`; on any failure it is removed.
    Connecting and every read time out after :func:`download_timeout` seconds (see :func:`_stream_to_file`).

    Args:
        url: http(s) URL.
        path: cache file (see :func:`cached_download_path`).
        hash_prefix: leading hex digits the file's SHA-256 must have.
        progress: show a progress bar.
        revalidate: with ``path`` cached, ask the server whether it changed (ETag/Last-Modified, answered by 304)
            and download it again if so; otherwise a cached ``path`` is used without contacting the server.

    Raises:
        PretrainedWeightsError: HTTP error, network error or timeout, short or corrupt body, hash mismatch; the
            message names the URL, the timeout and the cache file.
    """
    cached = path.is_file()
    if cached and not revalidate:
        return path
    timeout = download_timeout()
    limits = (
        f"timeout {timeout:g} s to connect and per read, at least {MIN_DOWNLOAD_RATE} bytes/s over each {timeout:g} s; "
        f"{DOWNLOAD_TIMEOUT_ENV} sets the timeout"
    )
    headers = {"User-Agent": "irpe-deit"} | (_conditional_headers(path) if cached else {})
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        opener = urllib.request.build_opener(_HttpRedirectsOnly)
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            try:
                with opener.open(urllib.request.Request(url, headers=headers), timeout=timeout) as response:
                    _stream_to_file(response, out, timeout=timeout, digest=digest, progress=progress)
            except urllib.error.HTTPError as err:
                if err.code == 304 and cached:
                    return path  # the cached copy is current
                raise
        if hash_prefix and not digest.hexdigest().startswith(hash_prefix):
            raise _DownloadError(f"SHA-256 {digest.hexdigest()[:16]}... does not start with {hash_prefix}")
        try:
            load_checkpoint_file(tmp)
        except Exception as err:  # torch.load fails with many types (zip, pickle, EOF, unsafe globals)
            raise _DownloadError(f"not a readable checkpoint ({_load_error_reason(err)})") from err
        _metadata_path(path).unlink(missing_ok=True)
        os.replace(tmp, path)
        meta = {
            "url": url,
            "etag": response.headers.get("ETag"),
            "last_modified": response.headers.get("Last-Modified"),
        }
        _metadata_path(path).write_text(json.dumps(meta, indent=1) + "\n")
    except (OSError, http.client.HTTPException, _DownloadError) as err:  # URLError/HTTPError/timeouts are OSError
        reason = f"{type(err).__name__}: {err}" if isinstance(err, (TimeoutError, http.client.HTTPException)) else err
        if cached:
            where = f"the copy downloaded earlier, {path}, was kept (give that path to use it anyway)"
        else:
            where = f"nothing was cached (cache file: {path})"
        raise PretrainedWeightsError(f"could not download {url}: {reason} ({limits}); {where}") from err
    finally:
        tmp.unlink(missing_ok=True)
        if not path.exists():
            with suppress(OSError):  # the URL's folder, unless it holds something else
                path.parent.rmdir()
    return path


def _help_text(location: str | os.PathLike, cache: Path) -> str:
    return (
        f"(source: {location}; download cache: {cache}). To use weights you already have, build the model with "
        "pretrained=False and load them with `python main.py --resume <checkpoint.pth>` (or "
        "`model.load_state_dict(torch.load(path, weights_only=True)['model'])`); IRPE_MODEL_ZOO_URL=<URL prefix or "
        "local directory> points the iRPE models at a mirror."
    )


def fetch_checkpoint(
    location: str | os.PathLike,
    *,
    cache_dir: str | os.PathLike | None = None,
    check_hash: bool = False,
    progress: bool = True,
    revalidate: bool = False,
) -> Path:
    """Local path of a checkpoint: a file path (or ``file://`` URL) as is, an http(s) URL downloaded into the cache.

    Args:
        location: http(s) URL, ``file://`` URL or local file.
        cache_dir: download directory (default: torch.hub's ``checkpoints`` directory).
        check_hash: verify the SHA-256 prefix that the file name carries (``<name>-<hex>.pth``).
        progress: show a download progress bar.
        revalidate: ask the server whether a cached download is still current (see :func:`download_checkpoint`).

    Raises:
        PretrainedWeightsError: missing local file, unsupported URL scheme, or failed download.
    """
    path = local_checkpoint_path(location)
    if path is not None:
        if not path.is_file():
            raise PretrainedWeightsError(f"no checkpoint file at {path}")
        return path
    url = str(location)
    path = cached_download_path(url, checkpoint_cache_dir(cache_dir))
    hash_prefix = None
    if check_hash:
        match = torch.hub.HASH_REGEX.search(os.path.basename(urllib.parse.urlsplit(url).path))
        hash_prefix = match.group(1) if match else None
    return download_checkpoint(url, path, hash_prefix=hash_prefix, progress=progress, revalidate=revalidate)


def read_checkpoint(path: Path, *, location: str | os.PathLike | None = None) -> Any:
    """The object in a checkpoint file (see :func:`load_checkpoint_file`).

    Args:
        path: the file (from :func:`fetch_checkpoint`).
        location: where it came from; when that is an http(s) URL, ``path`` is a cached download.

    Raises:
        PretrainedWeightsError: unreadable file (truncated, not a torch checkpoint, unsafe pickle). A cached download
            is deleted, so that the next attempt fetches it again; any other file is the user's and is left alone.
    """
    try:
        return load_checkpoint_file(path)
    except Exception as err:  # torch.load fails with many types (zip, pickle, EOF, unsafe globals): report them all
        downloaded = location is not None and local_checkpoint_path(location) is None
        if downloaded:
            path.unlink(missing_ok=True)
            _metadata_path(path).unlink(missing_ok=True)
            advice = f"it was a cached download of {location} and has been deleted, so the next attempt downloads it"
        else:
            advice = "it is read in place (not a download) and was left as it is: replace it with a complete copy"
        reason = _load_error_reason(err)
        raise PretrainedWeightsError(f"{path} is not a readable checkpoint ({reason}); {advice}") from err


def read_state_dict(path: Path, *, location: str | os.PathLike | None = None) -> dict[str, torch.Tensor]:
    """The model state of a checkpoint file: ``checkpoint['model']``, or the file itself if it is a flat state dict.

    Raises:
        PretrainedWeightsError: unreadable file (see :func:`read_checkpoint`) or no state dict.
    """
    checkpoint = read_checkpoint(path, location=location)
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, Mapping) else None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PretrainedWeightsError(f"{path} holds no state dict (expected {{'model': state_dict}})")
    return dict(state)


def adapt_state_dict(model: VisionTransformer, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fit a checkpoint to the constructor arguments of ``model`` (a new dict; ``state`` is left alone).

    * ``pos_embed`` of a square grid is resampled (bicubic) to the patch grid of ``model`` if it differs;
    * classifier heads whose number of classes differs are replaced by the model's own (fresh) ones.
    """
    state = dict(state)
    own = model.state_dict()
    pos = state.get("pos_embed")
    if pos is not None and pos.shape != own["pos_embed"].shape and pos.shape[-1] == own["pos_embed"].shape[-1]:
        num_patches = pos.shape[1] - model.num_prefix_tokens
        side = math.isqrt(max(num_patches, 0))
        if side * side == num_patches:
            state["pos_embed"] = resample_abs_pos_embed(
                pos, new_size=list(model.patch_grid), old_size=[side, side], num_prefix_tokens=model.num_prefix_tokens
            )
    for head in ("head", "head_dist"):
        weight = state.get(f"{head}.weight")
        own_weight = own.get(f"{head}.weight")
        if weight is not None and own_weight is not None and weight.shape[0] != own_weight.shape[0]:
            state[f"{head}.weight"] = own_weight
            state[f"{head}.bias"] = own[f"{head}.bias"]
    return state


def state_dict_mismatch(model: nn.Module, state: Mapping[str, torch.Tensor]) -> list[str]:
    """Human-readable differences between ``state`` and ``model.state_dict()`` (keys and shapes); empty if none."""
    own = model.state_dict()
    problems = []
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing:
        problems.append(f"missing keys ({len(missing)}): {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
    for key, value in state.items():
        if key in own and tuple(value.shape) != tuple(own[key].shape):
            problems.append(f"shape of {key}: checkpoint {tuple(value.shape)} vs model {tuple(own[key].shape)}")
    return problems


def load_pretrained(
    model: VisionTransformer,
    location: str | os.PathLike,
    *,
    cache_dir: str | os.PathLike | None = None,
    check_hash: bool = False,
    progress: bool = True,
) -> None:
    """Fetch, read, verify (keys and shapes) and strictly load a checkpoint into ``model``.

    Raises:
        PretrainedWeightsError: the checkpoint cannot be fetched or read, or does not match the model.
    """
    try:
        path = fetch_checkpoint(location, cache_dir=cache_dir, check_hash=check_hash, progress=progress)
        state = adapt_state_dict(model, read_state_dict(path, location=location))
    except PretrainedWeightsError as err:
        raise PretrainedWeightsError(f"{err} {_help_text(location, checkpoint_cache_dir(cache_dir))}") from err
    problems = state_dict_mismatch(model, state)
    if problems:
        raise PretrainedWeightsError(
            f"the checkpoint {path} does not match {type(model).__name__}: "
            + "; ".join(problems)
            + " "
            + _help_text(location, checkpoint_cache_dir(cache_dir))
        )
    model.load_state_dict(state, strict=True)
