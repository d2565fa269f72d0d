"""Prototypes of proposed fixes, measured by ``bench_keeper.py --prototypes`` (never used by the
service; not production code: no reconnect/session-loss handling).

``DebouncedMirror``: a ``CommitMirror`` whose children watch does not re-list ``data/`` on every
child event. kazoo's ``ChildrenWatch`` re-reads the whole child list (and re-arms the watch) as
soon as one create or delete is notified, so a burst of N creates under a directory of up to N
keys costs O(N^2) names transferred and walked by ``_on_children`` (a first publisher pass over
10k keys: ~8k re-lists, ~37M names). Waiting ``DEBOUNCE`` seconds after a notification before
re-listing coalesces a burst into a handful of re-lists; data changes of known keys still
arrive through their DataWatch at once, only *new* keys show up up to ``DEBOUNCE`` later.
"""

from __future__ import annotations

import threading

from kazoo.exceptions import NoNodeError

from rainer_server.keeper import CommitMirror


class DebouncedMirror(CommitMirror):
    DEBOUNCE = 0.05

    #: Children re-lists made (for the benchmark's report).
    relists = 0

    def _start_children_watch(self) -> None:
        threading.Thread(target=self._children_loop, name="rainer-mirror-children",
                         daemon=True).start()

    def _children_loop(self) -> None:
        while not self._closing.is_set():
            fired = threading.Event()
            try:
                children = self.client.get_children(self.data_path,
                                                    watch=lambda event: fired.set())
            except NoNodeError:
                return
            self.relists += 1
            self._on_children(children)
            while not fired.wait(0.5):
                if self._closing.is_set():
                    return
            self._closing.wait(self.DEBOUNCE)


def open_debounced_mirror(keeper, timeout: float = 60.0) -> DebouncedMirror:
    mirror = DebouncedMirror(keeper)
    mirror.start()
    if not mirror.wait_initialized(timeout):
        mirror.close()
        raise RuntimeError("debounced mirror not initialized")
    return mirror


# ---------------------------------------------------------------------- cached GET prototypes


def make_app(variant: str):
    """The service (``create_app()`` from the environment, as ``wsgi:app``) with a prototype
    of a cheaper mirror-backed ``GET /<key>``; for gunicorn: ``keeper_variants:make_app('x')``.

    - ``prebuilt``: each commit's response headers (the X-Rainer-* set, Content-Type,
      X-Rainer-Cached) are built once per commit object and reused (commits are immutable, and
      a mirror view change only brings new objects for the keys that changed), instead of
      ``_commit_headers`` + ``Headers.set``/``update`` on every request;
    - ``prebuilt_nometrics``: the same, and without the per-request metrics hooks (an upper
      bound of what a cheaper request-metrics path could win).
    A key missing from the mirror (or an invalid one) goes to the unchanged view.
    """
    from flask import Response

    from rainer_server import api
    from rainer_server import create_app
    from rainer_server.extension import get_rainer

    app = create_app()
    original = app.view_functions["rainer.get_head"]
    prebuilt: dict[int, tuple[object, list[tuple[str, str]]]] = {}

    def headers_of(commit) -> list[tuple[str, str]]:
        entry = prebuilt.get(id(commit))
        if entry is not None and entry[0] is commit:
            return entry[1]
        payload = commit.payload or b""
        try:
            payload.decode("utf-8")
            mimetype = "text/plain; charset=UTF-8"
        except UnicodeDecodeError:
            mimetype = "application/octet-stream"
        items = [*api._commit_headers(commit).items(), ("Content-Type", mimetype),
                 *api.CACHED.items()]
        if len(prebuilt) > 4 * len(get_rainer().mirror.current) + 1000:
            prebuilt.clear()  # old views' commits: bounded, rebuilt on demand
        prebuilt[id(commit)] = (commit, items)
        return items

    def get_head(key: str):
        view = get_rainer().cached_view()
        if view is not None:
            commit = view.current.get(key)
            if commit is not None:
                return Response(commit.payload or b"", 200, headers=headers_of(commit))
        return original(key)

    app.view_functions["rainer.get_head"] = get_head
    if variant == "prebuilt_nometrics":
        app.before_request_funcs.clear()
        app.after_request_funcs.clear()
    elif variant != "prebuilt":
        raise ValueError(f"unknown variant {variant!r}")
    return app
