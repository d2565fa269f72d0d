"""What gunicorn serves: ``gunicorn -c python:rainer_server.gunicorn_conf rainer_server.wsgi:app``.

Works from any directory once the package is installed (a wheel carries no top-level files).
"""

import sys

from rainer_server.errors import ConfigurationError
from rainer_server.web.extension import create_app

try:
    app = create_app()
except ConfigurationError as exc:
    # One line naming the setting, not a traceback: this is an operator's typo, not a bug.
    sys.exit(f"rainer: {exc}")
