from rainer_server.gunicorn_conf import *  # noqa: F401,F403  (the packaged settings and hooks)
