"""Models bundled with icpo; loading any model is :mod:`icpo.models.loading` (torch imported
there, not here).

``icpo/tiny`` is a ~0.9M-parameter ``LlamaForCausalLM`` with its tokenizer, pretrained (SFT) by
``scripts/make_tiny_model.py`` on :mod:`icpo.tasks.arithmetic` in the Table 5 (R1) template until
it is partly right, so that RL has room to improve it on a CPU. ``icpo/tiny-routes`` is the
testbed where ICPO's premise can hold (:mod:`icpo.tasks.routes`). It ships inside the package
(``icpo/models/tiny/``) and loads offline with ``from_pretrained(resolve_model_path("icpo/tiny"))``.
"""

from __future__ import annotations

import os
from pathlib import Path

TINY_MODEL = "icpo/tiny"
"""Hub-style id of the bundled tiny model (see :func:`resolve_model_path`)."""
TINY_ROUTES_MODEL = "icpo/tiny-routes"
"""The testbed model: ``icpo/tiny`` further trained on the two-route task of
:mod:`icpo.tasks.routes` by ``scripts/make_routes_model.py`` (see docs/experiments.md)."""

_BUNDLED = {TINY_MODEL: "tiny", TINY_ROUTES_MODEL: "tiny_routes"}


def bundled_model_dir(name: str = TINY_MODEL) -> Path:
    """Folder holding a bundled model's files inside the installed package."""
    if name not in _BUNDLED:
        raise ValueError(f"name: expected one of {sorted(_BUNDLED)}, got {name!r}")
    # A plain path next to this file: the package is installed editable or as a regular wheel
    # (never zipped), so importlib.resources.as_file would add nothing but a context manager.
    return Path(__file__).resolve().parent / _BUNDLED[name]


def resolve_model_path(path: str | os.PathLike) -> str:
    """Maps a bundled model id (``"icpo/tiny"``) to its folder; returns anything else unchanged."""
    text = os.fspath(path)
    if text in _BUNDLED:
        return str(bundled_model_dir(text))
    return text


__all__ = ["TINY_MODEL", "TINY_ROUTES_MODEL", "bundled_model_dir", "resolve_model_path"]
