from rainer_server.wsgi import app  # noqa: F401  (the packaged entry point)
