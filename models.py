"""Checkpoints, one path for all of them: fetch, read, adapt and verify, then load into a model.

Pretrained weights (:func:`load_pretrained`, used by :mod:`rpe_models`) and ``main.py``'s ``--resume``,
``--finetune`` and ``--teacher-path`` all go through :func:`fetch_checkpoint` (local files in place, http(s) URLs
downloaded with a timeout into a per-URL cache in torch.hub's directory), :func:`load_checkpoint` (``weights_only``),
:func:`checkpoint_state_dict` and :func:`load_state_dict` (after :func:`adapt_state_dict` for pretrained weights and
``--finetune``). Every failure raises a one-line :class:`CheckpointError`, which ``main.py`` prints as ``error: ...``.
"""

import argparse
import hashlib
import http.client
import logging
import math
import os
import re
import urllib.parse
import urllib.request
import warnings
from collections.abc import Mapping
from contextlib import suppress
from pathlib import Path
from typing import Any

import torch
from timm.models import clean_state_dict
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import nn

import utils
from utils import UserError

DOWNLOAD_TIMEOUT_ENV = "IRPE_DOWNLOAD_TIMEOUT"

# Classes that ``weights_only`` loading rebuilds besides tensors and plain data: DeiT's ``main.py`` (and so the
# original iRPE's) saves ``checkpoint['args'] = args``, an ``argparse.Namespace``: plain data, no code run.
CHECKPOINT_SAFE_GLOBALS: list[type] = [argparse.Namespace]

_SHOWN_KEYS = 8  # keys listed in an error message before "..." (the count is always given)


class CheckpointError(UserError, RuntimeError):  # a RuntimeError, as timm's loading raises
    """A checkpoint could not be fetched, read or matched to the model (one line, naming the file or URL)."""


PretrainedWeightsError = CheckpointError  # the name rpe_models and torch.hub users know pretrained failures by


class NoReleasedWeightsError(CheckpointError, ValueError):
    """``pretrained=True`` for a model that has no released checkpoint."""


def is_url(location: str | os.PathLike) -> bool:
    """Whether ``location`` is a URL (``scheme://...``) rather than a file-system path."""
    return isinstance(location, str) and re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", location) is not None


def local_checkpoint_path(location: str | os.PathLike) -> Path | None:
    """The file a path or ``file://`` URL names; None for an http(s) URL; a ``CheckpointError`` for other URLs."""
    if not is_url(location):
        return Path(location).expanduser()
    parts = urllib.parse.urlsplit(str(location))
    if parts.scheme.lower() == "file":
        return Path(urllib.request.url2pathname(parts.path))
    if parts.scheme.lower() not in ("http", "https"):
        raise CheckpointError(
            f"cannot fetch {location}: only http:// and https:// URLs are downloaded (and local paths or file:// URLs "
            f"read in place), not {parts.scheme}://; copy the file locally and give its path"
        )
    return None


def download_timeout() -> float:
    """Seconds a download waits to connect and for each read: ``$IRPE_DOWNLOAD_TIMEOUT`` (checked), else 60."""
    text = os.environ.get(DOWNLOAD_TIMEOUT_ENV, "").strip() or "60"
    with suppress(ValueError):
        if 0 < float(text) < math.inf:
            return float(text)
    raise CheckpointError(f"{DOWNLOAD_TIMEOUT_ENV}={text!r} must be a positive number of seconds")


def cached_download_path(url: str, cache: Path) -> Path:
    """``<cache>/<16 hex digits of SHA-256(url)>/<file name of url>``: two URLs never share a cached file."""
    name = os.path.basename(urllib.parse.unquote(urllib.parse.urlsplit(url).path))
    if name in ("", ".", ".."):
        name = "checkpoint.pth"
    return cache / hashlib.sha256(url.encode()).hexdigest()[:16] / name


def fetch_checkpoint(
    location: str | os.PathLike,
    *,
    cache_dir: str | os.PathLike | None = None,
    check_hash: bool = False,
    progress: bool = True,
    refresh: bool = False,
) -> Path:
    """Local path of a checkpoint: a file path (or ``file://`` URL) as is, an http(s) URL downloaded into the cache.

    A cached download is used without contacting the server, unless ``refresh`` (``main.py``'s flags: a run's
    ``checkpoint.pth`` changes every epoch). The transfer goes to a temporary file that replaces the cache file only
    when it ends without error (:func:`utils.atomic_write`; with ``check_hash``, the SHA-256 prefix of a
    ``<name>-<hex>.pth`` name, as torch.hub checks it, must match); connecting and every read time out after
    :func:`download_timeout` seconds.

    Raises:
        CheckpointError: missing local file, unsupported URL scheme, or failed download.
    """
    path = local_checkpoint_path(location)
    if path is not None:
        if not path.is_file():
            raise CheckpointError(f"no checkpoint file at {path}")
        return path
    cache = Path(cache_dir).expanduser() if cache_dir is not None else Path(torch.hub.get_dir()) / "checkpoints"
    url, path = str(location), cached_download_path(str(location), cache)
    if path.is_file() and not refresh:
        return path
    timeout, cached = download_timeout(), path.is_file()
    match = torch.hub.HASH_REGEX.search(path.name) if check_hash else None
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            size = int(response.headers.get("Content-Length") or 0) or None
            with torch.hub.tqdm(total=size, disable=not progress, unit="B", unit_scale=True) as bar:
                utils.atomic_write(path, lambda out: _copy_checked(response, out, match and match.group(1), bar.update))
    except (OSError, http.client.HTTPException, ValueError) as err:  # timeouts are OSError, a wrong hash ValueError
        kept = "the copy downloaded earlier was kept" if cached else "nothing was cached"
        raise CheckpointError(
            f"could not download {url}: {err} (timeout {timeout:g} s to connect and per read; "
            f"{DOWNLOAD_TIMEOUT_ENV} sets it); {kept} (cache file: {path})"
        ) from err
    return path


def _copy_checked(response: Any, out: Any, hash_prefix: str | None, advance: Any) -> None:
    """Copies the body of ``response`` into ``out``; ``ValueError`` unless its SHA-256 starts with ``hash_prefix``."""
    digest = hashlib.sha256()
    while chunk := response.read(1 << 20):
        out.write(chunk)
        digest.update(chunk)
        advance(len(chunk))
    if hash_prefix and not digest.hexdigest().startswith(hash_prefix):
        raise ValueError(f"its SHA-256 {digest.hexdigest()} does not start with {hash_prefix} (named in the file)")


def load_checkpoint_file(path: str | os.PathLike, *, mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` onto the CPU (rebuilding :data:`CHECKPOINT_SAFE_GLOBALS` too)."""
    with warnings.catch_warnings(), torch.serialization.safe_globals(CHECKPOINT_SAFE_GLOBALS):
        # A plain pickle makes torch warn about its protocol before failing; the failure is reported, not the warning.
        warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def _load_error_reason(err: Exception) -> str:
    """One line saying why ``torch.load`` failed (its ``weights_only`` errors span a paragraph of advice)."""
    match = re.search(r"WeightsUnpickler error:\s*(.*?)(?: Please use|\n|$)", str(err))  # may follow "\n\n"
    if match is None:
        return f"{type(err).__name__}: {(str(err).strip() or 'no detail').splitlines()[0]}"
    detail = match.group(1).strip() or "no detail"
    if detail.startswith("Unsupported operand"):  # torch.save writes none of these: a plain pickle, or no pickle
        return f"{type(err).__name__}: {detail}: not a file written by torch.save"
    return f"{type(err).__name__}: {detail} (only tensors and plain data are loaded)"


def load_checkpoint(location: str | os.PathLike, **fetch_options: Any) -> dict[str, Any]:
    """The dict saved in the checkpoint at ``location`` (path or URL, fetched with ``fetch_options``).

    Raises:
        CheckpointError: the file cannot be fetched or read, or holds no dict. An unreadable download is deleted
            (the next attempt fetches it again); a local file is the user's and is left alone.
    """
    path = fetch_checkpoint(location, **fetch_options)
    try:
        checkpoint = load_checkpoint_file(path)
    except Exception as err:  # torch.load fails with many types (zip, pickle, EOF, unsafe globals): report them all
        if local_checkpoint_path(location) is None:
            path.unlink(missing_ok=True)
            advice = f"it was a cached download of {location} and has been deleted, so the next attempt downloads it"
        else:
            advice = "it is read in place (not a download) and was left as it is: replace it with a complete copy"
        raise CheckpointError(f"{path} is not a readable checkpoint ({_load_error_reason(err)}); {advice}") from err
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"checkpoint {location} is not a dict (got {type(checkpoint).__name__})")
    return checkpoint


def checkpoint_state_dict(
    checkpoint: Mapping[str, Any], source: str | os.PathLike, entry: str = "model", *, required: bool = False
) -> dict[str, torch.Tensor]:
    """The state dict in ``checkpoint[entry]`` (unless ``required``: else in ``['state_dict']`` or the checkpoint).

    Raises:
        CheckpointError: the entry is missing (``required``) or holds anything but names mapped to tensors.
    """
    if required and entry not in checkpoint:
        keys = ", ".join(map(str, list(checkpoint)[:_SHOWN_KEYS]))
        raise CheckpointError(f"checkpoint {source} has no {entry!r} entry (keys: {keys})")
    state = checkpoint[entry] if entry in checkpoint else checkpoint.get("state_dict", checkpoint)
    where = f"checkpoint {source}: {entry!r} must map parameter names to tensors"
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{where}, got a {type(state).__name__}")
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"{where}, but {key!r} holds a {type(value).__name__} (is it a checkpoint written by main.py or a "
                "state_dict()?)"
            )
    return dict(state)


def adapt_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fit a checkpoint to the constructor arguments of ``model`` (a new dict; ``state`` is left alone).

    DDP's and ``torch.compile``'s key prefixes go; for a timm ViT (DeiT, the iRPE models) timm's
    ``checkpoint_filter_fn`` resamples ``pos_embed`` to the model's patch grid; classifier heads (``head``,
    ``head_dist``) of another number of classes stay the model's own, logged. The filter's errors (``RuntimeError``,
    ``ValueError``) propagate: :func:`load_state_dict` reports them.
    """
    state = clean_state_dict(state)
    if isinstance(model, VisionTransformer):
        state = checkpoint_filter_fn(state, model)
    own = model.state_dict()
    for head in ("head", "head_dist"):
        weight, own_weight = state.get(f"{head}.weight"), own.get(f"{head}.weight")
        if weight is None or own_weight is None or weight.shape[0] == own_weight.shape[0]:
            continue
        logging.getLogger(__name__).info(
            f"Not loading {head}.weight/bias: {weight.shape[0]} classes in the checkpoint, {own_weight.shape[0]} in "
            "the model (the head keeps its fresh initialisation)"
        )
        state.update({key: own[key] for key in (f"{head}.weight", f"{head}.bias") if key in own})
    return state


def _show(keys: list[str]) -> str:
    """The number of ``keys`` and the first :data:`_SHOWN_KEYS` of them, with ``...`` when there are more."""
    return f"({len(keys)}): " + ", ".join(keys[:_SHOWN_KEYS]) + (", ..." if len(keys) > _SHOWN_KEYS else "")


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

    ``source`` and ``name`` (default: the model's timm name) are for messages. ``adapt``: fit the weights to the
    model first (:func:`adapt_state_dict`; pretrained weights and finetuning), else only drop DDP's and
    ``torch.compile``'s key prefixes. ``strict``: every key of the model and of ``state`` must match in name and shape
    (pretrained weights, ``--resume``, ``--teacher-path``); otherwise (``--finetune``) keys one side lacks are skipped
    (e.g. the iRPE tables of a DeiT checkpoint), but one at least must match and shapes must agree.

    Returns the keys skipped (``missing_keys``: the model's, ``unexpected_keys``: the checkpoint's).

    Raises:
        CheckpointError: the weights do not fit the model (names the differing keys), or cannot be adapted.
    """
    name = name or (getattr(model, "pretrained_cfg", None) or {}).get("architecture") or type(model).__name__
    try:
        state = adapt_state_dict(model, state) if adapt else clean_state_dict(state)
    except (RuntimeError, ValueError) as err:
        raise CheckpointError(f"checkpoint {source}: cannot adapt it to {name}: {err}") from None
    own = model.state_dict()
    missing = [key for key in own if key not in state]
    unexpected = [key for key in state if key not in own]
    shapes = [
        f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(own[key].shape)}"
        for key, value in state.items()
        if key in own and value.shape != own[key].shape
    ]
    problems = {"missing keys": missing, "unexpected keys": unexpected, "shapes differ": shapes}
    if strict and any(problems.values()):
        found = "; ".join(f"{what} {_show(keys)}" for what, keys in problems.items() if keys)
        raise CheckpointError(f"checkpoint {source} does not match model {name} (is it from another model?): {found}")
    if len(unexpected) == len(state):
        raise CheckpointError(
            f"checkpoint {source}: none of its {len(state)} weights (e.g. {', '.join(list(state)[:3])}) is a weight of "
            f"{name}: it is from another architecture; use a checkpoint of a ViT/DeiT model"
        )
    if shapes:
        raise CheckpointError(
            f"checkpoint {source}: weight shapes differ from {name} {_show(shapes)}; only the head and the position "
            "embedding are adapted, so use a checkpoint of the same model size"
        )
    return model.load_state_dict(state, strict=strict)


def load_pretrained(
    model: nn.Module, location: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None, **fetch_options: Any
) -> None:
    """Fetch (``cache_dir`` and ``fetch_options`` as :func:`fetch_checkpoint` takes them), read, adapt, verify (keys
    and shapes) and strictly load the pretrained weights at ``location`` (path or URL) into ``model``.

    Raises:
        CheckpointError: the checkpoint cannot be fetched or read, or does not match the model; the message ends with
            what to do instead (local weights, a mirror).
    """
    try:
        checkpoint = load_checkpoint(location, cache_dir=cache_dir, **fetch_options)
        load_state_dict(model, checkpoint_state_dict(checkpoint, location), location, adapt=True)
    except CheckpointError as err:
        raise CheckpointError(
            f"{err} (source: {location}). To use weights you already have, build the model with pretrained=False and "
            "load them with `python main.py --resume <checkpoint.pth>` (or `model.load_state_dict(torch.load(path, "
            "weights_only=True)['model'])`); IRPE_MODEL_ZOO_URL=<URL prefix or local directory> points the iRPE "
            "models at a mirror."
        ) from err
