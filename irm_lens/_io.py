"""Files: atomic writing (every artefact irm_lens saves goes through here) and the cache
directory.

A crash at any moment leaves either the previous file or the new one, never a torn one:
data goes to a temporary file in the same directory, is flushed to disk, then renamed over
the target (``os.replace`` is atomic on POSIX and Windows).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

from irm_lens.errors import OutputPathError

_UMASK = os.umask(0o022)
os.umask(_UMASK)


def _ensure_writable_dir(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputPathError(
            f"Cannot create output directory {directory}: {exc.strerror or exc}. "
            "Choose a location you can write to."
        ) from exc
    if not os.access(directory, os.W_OK):
        raise OutputPathError(
            f"Output directory {directory} is not writable. Choose a location you can write to."
        )


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Write ``path`` atomically.

    Args:
        path: The final location.
        write: Called with a temporary path in the same directory; it must create that file.

    Returns:
        The final path.
    """
    path = Path(path)
    _ensure_writable_dir(path.parent)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        # mkstemp creates 0600 (and writers may recreate the file): use the usual permissions.
        os.chmod(tmp, 0o666 & ~_UMASK)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write a text file atomically (UTF-8)."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write a JSON file atomically, sorted and indented for diffs."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def cache_dir() -> Path:
    """Where converted models and built datasets are cached: ``$IRM_LENS_CACHE``, else
    ``$XDG_CACHE_HOME/irm_lens``."""
    if os.environ.get("IRM_LENS_CACHE"):
        return Path(os.environ["IRM_LENS_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg) / "irm_lens"
