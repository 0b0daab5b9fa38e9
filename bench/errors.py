"""The one error of the bench harness."""


class LoadError(RuntimeError):
    """A load tool failed, or a server did not answer every call correctly."""
