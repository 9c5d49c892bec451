"""The one domain error of the pipeline. The CLI shows it as one `Error: ...` line and exit status 2."""


class UserError(Exception):
    """Bad input from the user (config, data, store, cluster). Message names what is wrong and what is allowed."""

    @property
    def message(self) -> str:
        return str(self)
