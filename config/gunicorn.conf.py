"""gunicorn settings for Rainer: ``gunicorn -c config/gunicorn.conf.py wsgi:app``.

Command-line flags (``--bind``, ``--workers``) override these. Hooks stay thin: the logic lives
in ``rainer_server.gunicorn_hooks``.
"""

import os

bind = os.environ.get("RAINER_BIND", "127.0.0.1:8080")
workers = int(os.environ.get("RAINER_WORKERS", "2"))
worker_class = "sync"
# Database timeouts (3 s connect, 10 s read/write) sit well below this, so a sick database
# becomes a 503 rather than a killed worker.
timeout = 30
graceful_timeout = 30
keepalive = 5
# Load the app once in the master: a bad setting stops startup with one line instead of
# every worker failing in a loop. create_app opens no sockets and starts no threads.
preload_app = True
control_socket_disable = True
accesslog = "-"
errorlog = "-"


def post_fork(server, worker):
    from rainer_server import gunicorn_hooks

    gunicorn_hooks.post_fork(server, worker)


def worker_exit(server, worker):
    from rainer_server import gunicorn_hooks

    gunicorn_hooks.worker_exit(server, worker)
