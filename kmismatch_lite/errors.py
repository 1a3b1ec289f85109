"""The one error type the CLI turns into a single line and a non-zero exit."""


class KmmError(Exception):
    """A problem the user can fix (bad input, missing model, missing extra); shown as one line."""


class Stopped(KeyboardInterrupt):
    """The process was asked to stop by a signal other than Ctrl-C (SIGTERM, SIGHUP): unwound as
    Ctrl-C is, so stages clean up; `signum` gives the exit status 128 + signum."""

    received: int | None = None  # the signal, kept where a library turns Stopped into a plain KeyboardInterrupt

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum
        Stopped.received = signum


def stop_signal(exc: BaseException | None) -> int | None:
    """The signal behind an interruption: a SIGTERM or SIGHUP, or None for Ctrl-C."""
    if isinstance(exc, Stopped):
        return exc.signum
    return Stopped.received


def missing_extra(package: str, extra: str) -> KmmError:
    """The error for a backend whose library is not installed."""
    return KmmError(f"{package} is not installed: pip install 'kmismatch_lite[{extra}]'")
