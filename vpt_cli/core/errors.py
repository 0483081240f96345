"""Errors a user can act on, each with the exit code the CLI documents.

Library code raises these instead of printing; the CLI turns them into one line on stderr and
the exit code below (see README, "Exit codes").
"""


class VPTError(Exception):
    """Base class: a problem with the user's input or environment, not a bug."""

    exit_code = 1


class UsageError(VPTError):
    """Bad flags or config values."""

    exit_code = 2


class DataError(VPTError):
    """The image folder cannot be used (no images, empty classes, a single class...)."""

    exit_code = 3


class BackboneError(VPTError):
    """The backbone cannot be created or its weights cannot be loaded."""

    exit_code = 4


class TaskError(VPTError):
    """A task file is missing, corrupt, already exists, or does not fit the backbone."""

    exit_code = 5


class ExportError(VPTError):
    """An export failed or its output does not match the eager model."""

    exit_code = 6


class PredictError(VPTError):
    """Every input given to predict was unreadable."""

    exit_code = 7


class TrainingInterrupted(VPTError):
    """Ctrl-C (exit 130) or SIGTERM (exit 143) during training; the message says what can be resumed."""

    exit_code = 130

    def __init__(self, message: str, exit_code: int = 130):
        super().__init__(message)
        self.exit_code = exit_code


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process was so that training stops as on Ctrl-C (exit 143)."""

    exit_code = 143


def one_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message, cut to `limit` characters (library errors can run
    to pages), or its type name when it has no message."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__
