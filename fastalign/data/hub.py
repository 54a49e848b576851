"""Names of data sets, models and tokenizers: a local path, or a name on the Hugging Face Hub.

A name that reads as a local path (``./x``, ``../x``, ``/x``, ``~/x``, a data-file suffix, or a
first folder that exists here) is never looked up on the Hub: when it does not exist, that is a
``FileNotFoundError`` naming it and the working directory, at once.

Before a Hub lookup, one request without retries asks whether the Hub (``HF_ENDPOINT``) answers
within ``HF_HUB_ETAG_TIMEOUT`` seconds. When it does not (or ``HF_HUB_OFFLINE=1``), the name is
looked up in the local cache only (the libraries' offline mode): what was downloaded before still
loads, and anything else is one ``ConfigError`` line in a moment, where the libraries would retry
for up to a minute.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from fastalign.errors import ConfigError


def looks_local(name: str, suffixes: tuple[str, ...] = ()) -> bool:
    """Whether ``name`` reads as a local path rather than a Hub name (see the module docstring)."""
    first = name.split("/", 1)[0]
    return (name.startswith(("./", "../", "/", "~")) or name in (".", "..") or name.endswith(suffixes)
            or ("/" in name and first not in ("", ".", "..") and Path(first).exists()))


def not_found(name: str, what: str) -> FileNotFoundError:
    """``name: no such WHAT (looked in CWD)``."""
    return FileNotFoundError(f"{name}: no such {what} (looked in {os.getcwd()})")


def hub_reachable() -> bool:
    """Whether the Hub answers one request (any answer), never under ``HF_HUB_OFFLINE=1``."""
    from huggingface_hub import constants, get_session

    if constants.HF_HUB_OFFLINE:
        return False
    try:
        get_session().head(constants.ENDPOINT, timeout=constants.HF_HUB_ETAG_TIMEOUT)
    except Exception:
        return False
    return True


@contextlib.contextmanager
def _offline():
    """The Hub lookups of the block read the local cache only: huggingface_hub's offline mode,
    which transformers follows, and datasets' copy of it."""
    import datasets.config
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE = saved


def from_hub(load, what: str, name: str, hint: str = ""):
    """``load()``, which looks ``name`` up on the Hub; when the Hub does not answer, ``load()``
    from the local cache, and a ``ConfigError`` naming ``what`` and ``name`` (then ``hint``) where
    the cache does not hold it either."""
    if hub_reachable():
        return load()
    from huggingface_hub import constants

    try:
        with _offline():
            return load()
    except OSError as error:  # what transformers and datasets raise for a name they cannot find
        why = ("HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE
               else f"the Hugging Face Hub could not be reached ({constants.ENDPOINT})")
        raise ConfigError(f"{what} {name!r}: {why} and the local cache does not hold it{hint}") from error
