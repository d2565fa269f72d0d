"""Rainer apps for bench_core.py that differ from ``wsgi:app`` in one measured respect.

- ``rainer_nocache``: the real service with its list cache disabled, so every ``GET /diary``
  pays ``storage.heads()`` and serialisation, as the first list after any write does.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

from rainer_server import create_app  # noqa: E402


class _NeverStores(dict):
    def __setitem__(self, key, value):
        pass


def _make_nocache():
    app = create_app()
    app.extensions["rainer"].list_cache = _NeverStores()
    return app


rainer_nocache = _make_nocache()
