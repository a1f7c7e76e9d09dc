"""Errors that mean "the user's input is wrong". Stages print them as one line and exit 2;
anything else is a bug or an environment failure and keeps its traceback."""


class UserInputError(ValueError):
    """Bad config, bad data source, bad checkpoint: the message names what, where, and what was expected."""


class TrainingStopped(RuntimeError):
    """Training cannot go on (non-finite loss, too much bad data, a checkpoint that cannot be
    written); the message says why and which checkpoint is the last good one. Exit code 3."""
