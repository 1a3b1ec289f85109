"""The one error type the CLI turns into a single line and a non-zero exit."""


class KmmError(Exception):
    """A problem the user can fix (bad input, missing model, missing extra); shown as one line."""


def missing_extra(package: str, extra: str) -> KmmError:
    """The error for a backend whose library is not installed."""
    return KmmError(f"{package} is not installed: pip install 'kmismatch_lite[{extra}]'")
