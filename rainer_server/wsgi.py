"""What gunicorn serves: ``gunicorn -c python:rainer_server.gunicorn_conf rainer_server.wsgi:app``.

Works from any directory once the package is installed (a wheel carries no top-level files).
Importing it is starting the service: the settings are read and the database is checked
once, here (in gunicorn's master, before it forks: ``preload_app``).
"""

import sys

from rainer_server.errors import ConfigurationError
from rainer_server.web.context import get_rainer
from rainer_server.web.extension import create_app

try:
    app = create_app()
    # Not in create_app, which opens nothing (tests, embedding apps): a wrong database name
    # or password stops the start here, while a database that is down only logs a warning.
    get_rainer(app).check_database()
except ConfigurationError as exc:
    # One line naming the setting, not a traceback: this is an operator's typo, not a bug.
    sys.exit(f"rainer: {exc}")
