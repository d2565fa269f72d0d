"""Admin commands: ``flask --app wsgi rainer <command>``."""

from __future__ import annotations

import click
from flask.cli import AppGroup

from rainer_server.extension import get_rainer

rainer_cli = AppGroup("rainer", help="Rainer admin commands.")


@rainer_cli.command("init-db")
def init_db() -> None:
    """Create the journal table when missing."""
    rainer = get_rainer()
    rainer.storage.start()
    click.echo(f"Journal table {rainer.settings.table!r} is ready.")
