"""User-facing errors: one clear line, non-zero exit, no traceback."""
import click


class UserError(click.ClickException):
    """Bad input from the user (config, data, store, cluster). Message names what is wrong and what is allowed."""

    exit_code = 2
