"""The WSGI entry point: ``gunicorn -c config/gunicorn.conf.py wsgi:app``."""

import sys

from rainer_server import ConfigurationError
from rainer_server import create_app

try:
    app = create_app()
except ConfigurationError as exc:
    # One line naming the setting, not a traceback: this is an operator's typo, not a bug.
    sys.exit(f"rainer: {exc}")
