"""The one exception for user errors: the CLI prints its message as one line on stderr and exits 1.

Library code raises UserError for anything the user can fix (a bad file, a bad option, a foreign
checkpoint); the message names the problem and what to do. Anything else is a bug and may show a
traceback.
"""
import click


class UserError(click.ClickException):
    """A problem with the user's input, reported as one line: 'Error: <message>'."""
