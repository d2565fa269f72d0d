"""gunicorn settings for Rainer: ``gunicorn -c python:rainer_server.gunicorn_conf rainer_server.wsgi:app``
(``config/gunicorn.conf.py`` and ``wsgi.py`` at the top of a checkout are shims over these).

``RAINER_BIND`` and ``RAINER_WORKERS`` are settings like any other (``rainer_server.settings``
validates them all, from the environment and the ``RAINER_CONFIG`` file); command-line flags
(``--bind``, ``--workers``) override them. Hooks stay thin: the logic lives in
``rainer_server.gunicorn_hooks``.
"""

import os
import sys

# The settings first (core only: no framework, no thread, no socket is made by importing it)...
from rainer_server.errors import ConfigurationError
from rainer_server.settings import configured_values
from rainer_server.settings import load_settings
from rainer_server.settings import without_prefix

try:
    # Every setting, not just gunicorn's: a bad one stops startup before anything is made.
    # Unknown names are reported once, when the app reads the same sources.
    _settings = load_settings(without_prefix(configured_values(os.environ)))
except ConfigurationError as exc:
    # gunicorn prints a traceback for any exception in its config file; this is one line.
    sys.exit(f"rainer: {exc}")

if _settings.worker_class == "gevent":
    # ...then gevent's monkey-patching, before the app is imported and preloaded here in the
    # master: the locks, thread-locals and sockets that peewee, kazoo and the app make at
    # load time must be gevent's, or a greenlet waiting on one would block the whole worker
    # (gunicorn's gevent worker patches again after the fork, which changes nothing then).
    from gevent import monkey

    monkey.patch_all()

from rainer_server import gunicorn_hooks  # noqa: E402  (after the patching, on purpose)

gunicorn_hooks.route_startup_logging()

# Prometheus multiprocess mode: every worker writes its metrics to files in this directory
# and /metrics adds them up. It must be set before the (preloaded) app imports
# prometheus_client; a given PROMETHEUS_MULTIPROC_DIR is emptied, else a fresh temporary one
# is made (and removed on exit).
gunicorn_hooks.prepare_metrics_dir()

bind = _settings.bind
workers = _settings.workers
# gevent: a request waiting for a change (a blocking read, a watched feed) is a greenlet, not
# a worker, so a thousand watchers cost a thousand greenlets, each without a database
# connection (README, "Deploying"). sync: one request per worker, waits capped at 20 s.
worker_class = _settings.worker_class
worker_connections = _settings.worker_connections
# Database timeouts (RAINER_DATABASE_TIMEOUT, 2 s, for a gevent worker's whole operation; the
# sync worker's socket timeouts, 3 s connect and 10 s read/write) sit well below this, so a
# sick database becomes a 503 rather than a killed worker. (The gevent worker's heartbeat
# does not depend on its requests: a request may wait longer.)
timeout = 30
graceful_timeout = 30
keepalive = 5
# Load the app once in the master: a database that refuses the configured name or user
# stops startup with one line instead of every worker failing in a loop. The check closes
# its connection, and create_app opens no sockets and starts no threads: nothing is forked.
preload_app = True
control_socket_disable = True
accesslog = "-"
errorlog = "-"
# The proxy in front (deploy/nginx/rainer.conf) runs on the same host: trust its
# X-Forwarded-Proto. Behind a proxy elsewhere, set FORWARDED_ALLOW_IPS to its address.
forwarded_allow_ips = os.environ.get("FORWARDED_ALLOW_IPS", "127.0.0.1,::1")
# gunicorn's logger computes every atom it knows for each line; this one only those named below.
logger_class = "rainer_server.gunicorn_logging.AccessLogger"
# The default format plus the client address nginx forwards and the time taken (ms).
access_log_format = (
    '%(h)s %({x-forwarded-for}i)s %(l)s %(u)s %(t)s "%(r)s" %(s)s %(b)s "%(f)s" "%(a)s" %(M)sms'
)


def on_starting(server):
    gunicorn_hooks.on_starting(server)


def on_reload(server):
    gunicorn_hooks.on_reload(server)


def when_ready(server):
    gunicorn_hooks.when_ready(server)


def post_fork(server, worker):
    gunicorn_hooks.post_fork(server, worker)


def post_worker_init(worker):
    gunicorn_hooks.post_worker_init(worker)


def worker_exit(server, worker):
    gunicorn_hooks.worker_exit(server, worker)


def child_exit(server, worker):
    gunicorn_hooks.child_exit(server, worker)


def on_exit(server):
    gunicorn_hooks.on_exit(server)
