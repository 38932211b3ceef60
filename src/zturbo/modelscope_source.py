"""ModelScope as a model source: `modelscope:owner/name`, or a plain repo id under
ZTURBO_MODEL_SOURCE=modelscope.

Downloads go through the `modelscope` library into its own cache (MODELSCOPE_CACHE, else
~/.cache/modelscope) with its progress bars. The library has no offline environment variable of
its own (offline is its `local_files_only` argument), so the Hugging Face one, HF_HUB_OFFLINE (or
TRANSFORMERS_OFFLINE), switches both hubs off the network.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from pathlib import Path

from .config import MODEL_SOURCE_CHOICES as HUBS
from .errors import ModelNotFoundError

log = logging.getLogger("zturbo")

MODELSCOPE = "modelscope"
INSTALL_HINT = "pip install 'zturbo[modelscope]'"
# Two letters at least, so a Windows drive ("C:") is never read as a hub.
_PREFIX = re.compile(r"^([A-Za-z][\w-]+):(.*)$")
_TRUE = {"1", "ON", "YES", "TRUE"}


def split_hub(name: str) -> tuple[str | None, str]:
    """(hub, rest) of a model name: ('modelscope', 'owner/name') for 'modelscope:owner/name', the
    same for 'hf:', and (None, name) for a name without a prefix."""
    match = _PREFIX.match(name)
    if match is None:
        return None, name
    hub, rest = match.group(1), match.group(2)
    if hub not in HUBS:
        raise ModelNotFoundError(
            f"model source {hub!r} in {name!r} is not one of {', '.join(HUBS)} "
            f"(write modelscope:owner/name or hf:owner/name, or a local directory)"
        )
    return hub, rest


def offline_switch() -> str | None:
    """'HF_HUB_OFFLINE=1' (or TRANSFORMERS_OFFLINE's) when one is on, read as huggingface_hub reads them."""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        value = os.environ.get(name)
        if value:  # the first one set decides, as in huggingface_hub
            return f"{name}={value}" if value.upper() in _TRUE else None
    return None


def cache_dir() -> Path:
    """ModelScope's cache root (where its downloads go), for messages."""
    return Path(os.environ.get("MODELSCOPE_CACHE") or Path.home() / ".cache" / "modelscope").expanduser()


def download(repo_id: str, patterns: list[str], complete: Callable[[Path], bool]) -> Path:
    """The local snapshot of ModelScope repo `repo_id` holding the files `patterns` match.

    A cached snapshot that is `complete` is used as it is: asking ModelScope would make the
    library hash every cached file against its listing, this model's 33 GB at each start (tens
    of seconds at the least). Otherwise the files are downloaded, unless the network is switched off.
    """
    name = f"{MODELSCOPE}:{repo_id}"
    try:
        from modelscope.hub.errors import CacheNotFound, NetworkError
        from modelscope.hub.snapshot_download import snapshot_download
    except ImportError:
        raise ModelNotFoundError(
            f"model {name!r} comes from ModelScope, which needs the modelscope package: {INSTALL_HINT}"
        ) from None

    try:
        local: Path | None = Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except CacheNotFound:
        local = None
    if local is not None and complete(local):
        return local

    def not_cached(reason: str) -> ModelNotFoundError:
        state = "not in" if local is None else "incomplete in"
        return ModelNotFoundError(
            f"model {name!r} is {state} the local ModelScope cache ({cache_dir()}) and {reason}; "
            f"download it on a connected machine (`modelscope download --model {repo_id}`, then copy "
            f"the cache) or pass --model a local directory in the diffusers layout"
        )

    switch = offline_switch()
    if switch is not None:
        raise not_cached(f"{switch} keeps zturbo off the network (unset it to download)")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except NetworkError as e:
        unreachable = f"ModelScope cannot be reached ({_reason(e)}); check the network or MODELSCOPE_DOMAIN"
        raise not_cached(unreachable) from None
    except Exception as e:  # the library wraps some hub errors in requests' HTTPError
        known = _hub_error(e, repo_id)
        if known is None:
            raise
        raise known from None


def _hub_error(error: Exception, repo_id: str) -> ModelNotFoundError | None:
    """The clear error for a hub failure the library reports (None: not one it names)."""
    from modelscope.hub.errors import AuthenticationError, HubError, NotExistError, PermissionDeniedError

    cause = error.__cause__ if error.__cause__ is not None else error
    if isinstance(cause, NotExistError):
        return ModelNotFoundError(
            f"model {repo_id!r} does not exist on ModelScope (or is private): check the name on "
            f"https://modelscope.cn/models/{repo_id}"
        )
    if isinstance(cause, (AuthenticationError, PermissionDeniedError)):
        return ModelNotFoundError(
            f"model {repo_id!r} on ModelScope needs a login: `modelscope login --token TOKEN` or "
            f"MODELSCOPE_API_TOKEN, with access to the repository"
        )
    if isinstance(cause, (HubError, OSError)):
        return ModelNotFoundError(
            f"downloading {MODELSCOPE + ':' + repo_id!r} from ModelScope failed: {_first_line(cause)}; run again "
            f"to resume, or pass --model a local directory"
        )
    return None


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _reason(error: BaseException) -> str:
    """A connection error's root cause: urllib3 buries it after 'Caused by' behind the URL."""
    text = _first_line(error)
    _, found, cause = text.rpartition("(Caused by ")
    return cause.removesuffix(")") if found else text
