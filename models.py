"""Checkpoints, one path for all of them: fetch, read, verify and adapt, then load into a model.

Pretrained weights (:func:`load_pretrained`, which :mod:`rpe_models` builds its pretrained models with) and the
checkpoints of ``main.py``'s ``--resume``, ``--finetune`` and ``--teacher-path`` all go through these steps:

1. fetch (:func:`fetch_checkpoint`): a local path or ``file://`` URL is used in place; an http(s) URL is downloaded
   (with timeouts, see :func:`download_checkpoint`) into torch.hub's cache (``torch.hub.get_dir()/checkpoints``, or
   timm's ``cache_dir``) under a folder named by a hash of the URL; other URL schemes are refused (:func:`is_url`
   is the one URL rule);
2. read (:func:`load_checkpoint`): ``torch.load(weights_only=True)``; :func:`checkpoint_state_dict` takes the model
   state out and checks that it maps names to tensors;
3. adapt (:func:`adapt_state_dict`, pretrained weights and ``--finetune`` only): the model's own timm
   ``checkpoint_filter_fn`` (``pos_embed`` resampled to the model's patch grid), and classifier heads of another
   number of classes replaced by the model's fresh ones;
4. verify and load (:func:`load_state_dict`): key by key and shape by shape against the model, strictly, or for
   ``--finetune`` skipping the weights one side lacks.

Every failure raises :class:`CheckpointError`, one line naming the file or URL; it is a ``utils.UserError``, which
``main.py`` prints as ``error: ...`` with exit code 2.

The models themselves are registered in timm by :mod:`rpe_models` (the iRPE models); the plain DeiT baselines are
timm's own ``deit_*`` models, whose layout is the DeiT release's.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import logging
import math
import os
import re
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Callable, Mapping
from contextlib import suppress
from pathlib import Path
from typing import Any

import torch
from torch import nn

from utils import UserError

__all__ = [
    "CHECKPOINT_SAFE_GLOBALS",
    "CheckpointError",
    "NoReleasedWeightsError",
    "PretrainedWeightsError",
    "adapt_state_dict",
    "checkpoint_cache_dir",
    "checkpoint_state_dict",
    "fetch_checkpoint",
    "is_url",
    "load_checkpoint",
    "load_pretrained",
    "load_state_dict",
    "read_checkpoint",
    "state_dict_mismatch",
]

_logger = logging.getLogger(__name__)

# Downloads: only these URL schemes are fetched (other URLs are refused up front; file:// URLs are local paths).
DOWNLOAD_SCHEMES = ("http", "https")
# Seconds to wait for a connection and for each read; the environment variable overrides it.
DOWNLOAD_TIMEOUT_ENV = "IRPE_DOWNLOAD_TIMEOUT"
DEFAULT_DOWNLOAD_TIMEOUT = 60.0
# Bytes per second a download must keep up over every timeout-long stretch: a trickling server fails, not hangs.
MIN_DOWNLOAD_RATE = 1024
_DOWNLOAD_CHUNK = 1 << 20

# Classes that ``weights_only`` loading may rebuild besides tensors and plain data: DeiT's ``main.py`` (and so the
# original iRPE's) saves its flags as ``checkpoint['args'] = args``, an ``argparse.Namespace``, which holds plain data
# and runs no code when rebuilt.
CHECKPOINT_SAFE_GLOBALS: list[type] = [argparse.Namespace]

# Key prefixes of a state dict saved from a wrapped model: DistributedDataParallel's and torch.compile's.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# Keys listed in an error message before "..." (the count is always given).
_SHOWN_KEYS = 8


class CheckpointError(UserError, RuntimeError):
    """A checkpoint could not be fetched, read or matched to the model (one line, naming the file or URL).

    A ``utils.UserError`` (``main.py`` prints it as ``error: ...``, exit code 2) and a ``RuntimeError`` (what timm's
    own loading raises, and what code around ``timm.create_model(..., pretrained=True)`` catches).
    """


# The name pretrained-weight failures have been raised under (rpe_models, torch.hub users): the same class.
PretrainedWeightsError = CheckpointError


class NoReleasedWeightsError(CheckpointError, ValueError):
    """``pretrained=True`` for a model that has no released checkpoint."""


# ------------------------------------------------------------------------------------------------------------------
# Fetching and reading.
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
        CheckpointError: a URL of another scheme (``ftp://``, ``s3://``, ...), refused before any connection.
    """
    if not is_url(location):
        return Path(location).expanduser()
    parts = urllib.parse.urlsplit(str(location))
    scheme = parts.scheme.lower()
    if scheme == "file":
        return Path(urllib.request.url2pathname(parts.path))
    if scheme not in DOWNLOAD_SCHEMES:
        raise CheckpointError(
            f"cannot fetch {location}: only http:// and https:// URLs are downloaded (and local paths or file:// URLs "
            f"read in place), not {scheme}://; copy the file locally and give its path"
        )
    return None


def download_timeout() -> float:
    """The download timeout in seconds: ``$IRPE_DOWNLOAD_TIMEOUT``, else :data:`DEFAULT_DOWNLOAD_TIMEOUT`.

    Raises:
        CheckpointError: the variable is set to something other than a positive number.
    """
    text = os.environ.get(DOWNLOAD_TIMEOUT_ENV, "").strip()
    if not text:
        return DEFAULT_DOWNLOAD_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (value > 0 and math.isfinite(value)):
        raise CheckpointError(f"{DOWNLOAD_TIMEOUT_ENV}={text!r} must be a positive number of seconds")
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
    """Why a download was abandoned (turned into a :class:`CheckpointError` naming URL, timeout and cache)."""


def _load_error_reason(err: Exception) -> str:
    """One line saying why ``torch.load`` failed (its ``weights_only`` errors span a paragraph of advice)."""
    text = str(err)
    match = re.search(r"WeightsUnpickler error:\s*(.*?)(?: Please use|\n|$)", text)  # the detail may follow "\n\n"
    if match:
        detail = match.group(1).strip() or "no detail"
        if detail.startswith("Unsupported operand"):  # torch.save writes none of these: a plain pickle, or no pickle
            return f"{type(err).__name__}: {detail}: not a file written by torch.save"
        return f"{type(err).__name__}: {detail} (only tensors and plain data are loaded)"
    return f"{type(err).__name__}: {text.strip().splitlines()[0] if text.strip() else 'no detail'}"


def load_checkpoint_file(path: str | os.PathLike, *, mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` onto the CPU: how every checkpoint and download is read.

    Besides tensors and plain data it rebuilds only :data:`CHECKPOINT_SAFE_GLOBALS`; ``mmap``: memory-mapped (a zip
    checkpoint read for a few fields without loading its tensors).
    """
    with warnings.catch_warnings(), torch.serialization.safe_globals(CHECKPOINT_SAFE_GLOBALS):
        # A plain pickle makes torch warn about its protocol before failing; the failure is reported, not the warning.
        warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


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
        CheckpointError: HTTP error, network error or timeout, short or corrupt body, hash mismatch; the
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
        raise CheckpointError(f"could not download {url}: {reason} ({limits}); {where}") from err
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
        CheckpointError: missing local file, unsupported URL scheme, or failed download.
    """
    path = local_checkpoint_path(location)
    if path is not None:
        if not path.is_file():
            raise CheckpointError(f"no checkpoint file at {path}")
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
        CheckpointError: unreadable file (truncated, not a torch checkpoint, unsafe pickle). A cached download
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
        raise CheckpointError(f"{path} is not a readable checkpoint ({reason}); {advice}") from err


def load_checkpoint(
    location: str | os.PathLike,
    *,
    cache_dir: str | os.PathLike | None = None,
    check_hash: bool = False,
    progress: bool = True,
    revalidate: bool = False,
) -> dict[str, Any]:
    """Fetch and read a checkpoint: the dict saved in the file at ``location`` (path, ``file://`` or http(s) URL).

    Args:
        location: where the checkpoint is (see :func:`fetch_checkpoint`).
        cache_dir: download directory (default: torch.hub's ``checkpoints`` directory).
        check_hash: verify the SHA-256 prefix that the file name carries (``<name>-<hex>.pth``).
        progress: show a download progress bar.
        revalidate: ask the server whether a cached download is still current: ``main.py`` does, as a run's
            ``checkpoint.pth`` changes every epoch; released weights do not change.

    Raises:
        CheckpointError: the file cannot be fetched or read, or holds something other than a dict.
    """
    path = fetch_checkpoint(
        location, cache_dir=cache_dir, check_hash=check_hash, progress=progress, revalidate=revalidate
    )
    checkpoint = read_checkpoint(path, location=location)
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"checkpoint {location} is not a dict (got {type(checkpoint).__name__})")
    return checkpoint


# ------------------------------------------------------------------------------------------------------------------
# Verifying and adapting.
# ------------------------------------------------------------------------------------------------------------------


def checkpoint_state_dict(
    checkpoint: Mapping[str, Any], source: str | os.PathLike, entry: str = "model", *, required: bool = False
) -> dict[str, torch.Tensor]:
    """The state dict held in ``checkpoint[entry]``, checked to map parameter names to tensors.

    Without that entry (and unless ``required``), a timm-style ``checkpoint['state_dict']`` or the checkpoint itself
    (a bare ``model.state_dict()``) is taken.

    Raises:
        CheckpointError: the entry is missing (``required``) or holds anything but names mapped to tensors.
    """
    if entry in checkpoint:
        state = checkpoint[entry]
    elif required:
        keys = ", ".join(map(str, list(checkpoint)[:_SHOWN_KEYS]))
        raise CheckpointError(f"checkpoint {source} has no {entry!r} entry (keys: {keys})")
    else:
        state = checkpoint.get("state_dict", checkpoint)
    where = f"checkpoint {source}: {entry!r}"
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{where} must map parameter names to tensors, got a {type(state).__name__}")
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"{where} must map parameter names to tensors, but {key!r} holds a {type(value).__name__}"
                " (is it a checkpoint written by main.py or a state_dict()?)"
            )
    return dict(state)


def _strip_wrapper_prefixes(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with the key prefixes of :data:`_WRAPPER_PREFIXES` removed (DDP's ``module.``, compile's)."""
    out = {}
    for key, value in state.items():
        for prefix in _WRAPPER_PREFIXES:
            key = key.removeprefix(prefix)
        out[key] = value
    return out


def _checkpoint_filter_fn(model: nn.Module) -> Callable[[dict[str, torch.Tensor], nn.Module], Any] | None:
    """The timm ``checkpoint_filter_fn`` of ``model``: that of the module defining its class or a base class.

    timm gives every model family one in its module (``timm.models.vision_transformer.checkpoint_filter_fn`` for
    ViT, DeiT and, through their base class, the iRPE models); it converts older layouts and resamples
    ``pos_embed`` (and the patch embedding) to the model's size.
    """
    for cls in type(model).__mro__:
        filter_fn = getattr(sys.modules.get(cls.__module__), "checkpoint_filter_fn", None)
        if callable(filter_fn):
            return filter_fn
    return None


def _classifier_names(model: nn.Module) -> list[str]:
    """The classifier heads of ``model``: its pretrained cfg's ``classifier`` plus DeiT's ``head``/``head_dist``."""
    classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or ()
    names = [classifier] if isinstance(classifier, str) else list(classifier)
    return list(dict.fromkeys([*names, "head", "head_dist"]))


def adapt_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fit a checkpoint to the constructor arguments of ``model`` (a new dict; ``state`` is left alone).

    * the model's timm ``checkpoint_filter_fn`` runs (see :func:`_checkpoint_filter_fn`): ``pos_embed`` is resampled
      to the patch grid of ``model`` (built for another ``img_size``);
    * classifier heads whose number of classes differs are replaced by the model's own freshly initialised ones
      (another ``num_classes``), and logged.

    Raises:
        RuntimeError, ValueError: the filter cannot convert ``state`` (:func:`load_state_dict` reports it).
    """
    state = _strip_wrapper_prefixes(state)
    filter_fn = _checkpoint_filter_fn(model)
    if filter_fn is not None:
        state = dict(filter_fn(state, model))
    own = model.state_dict()
    for head in _classifier_names(model):
        weight, own_weight = state.get(f"{head}.weight"), own.get(f"{head}.weight")
        if weight is None or own_weight is None or weight.shape[0] == own_weight.shape[0]:
            continue
        _logger.info(
            f"Not loading {head}.weight/bias: {weight.shape[0]} classes in the checkpoint, {own_weight.shape[0]} in "
            "the model (the head keeps its fresh initialisation)"
        )
        for key in (f"{head}.weight", f"{head}.bias"):
            if key in own:
                state[key] = own[key]
    return state


def _show(keys: list[str]) -> str:
    """The first :data:`_SHOWN_KEYS` of ``keys``, comma-separated, with ``...`` when there are more."""
    return ", ".join(keys[:_SHOWN_KEYS]) + (", ..." if len(keys) > _SHOWN_KEYS else "")


def _shape_mismatches(own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> list[str]:
    """``<key>: checkpoint (shape) vs model (shape)`` for every key both hold with different shapes."""
    return [
        f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(own[key].shape)}"
        for key, value in state.items()
        if key in own and tuple(value.shape) != tuple(own[key].shape)
    ]


def state_dict_mismatch(model: nn.Module, state: Mapping[str, torch.Tensor]) -> list[str]:
    """Human-readable differences between ``state`` and ``model.state_dict()`` (keys and shapes); empty if none."""
    own = model.state_dict()
    problems = []
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing:
        problems.append(f"missing keys ({len(missing)}): {_show(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {_show(unexpected)}")
    shapes = _shape_mismatches(own, state)
    problems += [f"shape of {shape}" for shape in shapes[:_SHOWN_KEYS]]
    if len(shapes) > _SHOWN_KEYS:
        problems.append(f"... ({len(shapes)} shapes differ in all)")
    return problems


def model_name(model: nn.Module) -> str:
    """The timm name ``model`` was created under (its pretrained cfg's ``architecture``), else its class name."""
    return (getattr(model, "pretrained_cfg", None) or {}).get("architecture") or type(model).__name__


def load_state_dict(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    source: str | os.PathLike,
    *,
    name: str | None = None,
    adapt: bool = False,
    strict: bool = True,
) -> nn.modules.module._IncompatibleKeys:
    """Verify ``state`` against ``model`` and load it: the one place where a checkpoint meets a model.

    Key prefixes of wrapped models (DDP, ``torch.compile``) are removed first.

    Args:
        model: the model to load into.
        state: its weights (from :func:`checkpoint_state_dict`).
        source: where they came from, for messages.
        name: the model's name, for messages (default: :func:`model_name`).
        adapt: fit the weights to the model first (:func:`adapt_state_dict`): pretrained weights and finetuning.
        strict: every key of the model and of ``state`` must match in name and shape (pretrained weights,
            ``--resume``, ``--teacher-path``). Otherwise (``--finetune``) keys one side lacks are skipped (e.g. the
            iRPE tables when starting from a DeiT checkpoint), but at least one must match and shapes must agree.

    Returns:
        The keys skipped (``missing_keys``: the model's, ``unexpected_keys``: the checkpoint's); empty when strict.

    Raises:
        CheckpointError: the weights do not fit the model (names the differing keys), or cannot be adapted.
    """
    name = name or model_name(model)
    if adapt:
        try:
            state = adapt_state_dict(model, state)
        except (RuntimeError, ValueError) as err:
            raise CheckpointError(f"checkpoint {source}: cannot adapt it to {name}: {err}") from None
    else:
        state = _strip_wrapper_prefixes(state)
    if strict:
        problems = state_dict_mismatch(model, state)
        if problems:
            raise CheckpointError(
                f"checkpoint {source} does not match model {name} (is it from another model?): " + "; ".join(problems)
            )
        return model.load_state_dict(state, strict=True)
    own = model.state_dict()
    if not any(key in own for key in state):
        raise CheckpointError(
            f"checkpoint {source}: none of its {len(state)} weights (e.g. {', '.join(list(state)[:3])}) is a weight of "
            f"{name}: it is from another architecture; use a checkpoint of a ViT/DeiT model"
        )
    shapes = _shape_mismatches(own, state)
    if shapes:
        raise CheckpointError(
            f"checkpoint {source}: {len(shapes)} weight shapes differ from {name}: {_show(shapes)}; only the head and "
            "the position embedding are adapted, so use a checkpoint of the same model size"
        )
    return model.load_state_dict(state, strict=False)


def load_pretrained(
    model: nn.Module,
    location: str | os.PathLike,
    *,
    cache_dir: str | os.PathLike | None = None,
    check_hash: bool = False,
    progress: bool = True,
) -> None:
    """Fetch, read, adapt, verify (keys and shapes) and strictly load pretrained weights into ``model``.

    Raises:
        CheckpointError: the checkpoint cannot be fetched or read, or does not match the model; the message ends with
            what to do instead (local weights, a mirror).
    """
    try:
        checkpoint = load_checkpoint(location, cache_dir=cache_dir, check_hash=check_hash, progress=progress)
        load_state_dict(model, checkpoint_state_dict(checkpoint, location), location, adapt=True)
    except CheckpointError as err:
        raise CheckpointError(f"{err} {_help_text(location, checkpoint_cache_dir(cache_dir))}") from err
