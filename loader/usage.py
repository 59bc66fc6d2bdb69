"""Usage errors of the project's commands as one line: ``PROG: error: MESSAGE``, exit code 2.

Click prints a usage error (a missing argument, a bad option value) as three lines (usage, a
hint, the error); the commands print only the error, naming the option, like every other bad
input they refuse.
"""

from __future__ import annotations

import sys
from typing import Any, NoReturn

import click


def fail(prog: str, message: str) -> NoReturn:
    """Print ``prog: error: message`` on stderr and exit with code 2."""
    click.echo(f"{prog}: error: {message}", err=True)
    sys.exit(2)


class OneLineUsage(click.Command):
    """A click command whose argument and option errors are one line (:func:`fail`).

    ``prog``: the name the errors start with (``@click.command(cls=OneLineUsage, prog=...)``);
    by default the name the command was invoked as.
    """

    def __init__(self, *args: Any, prog: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.prog = prog

    def make_context(self, info_name: str | None, args: list[str], parent=None, **extra: Any):  # noqa: ANN001, ANN201
        try:
            return super().make_context(info_name, args, parent, **extra)
        except click.UsageError as e:
            fail(self.prog or info_name or str(self.name), e.format_message())
