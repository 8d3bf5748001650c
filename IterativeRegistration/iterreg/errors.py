"""Errors a user can act on. Their message is one sentence naming the problem and what to do."""


class InputError(ValueError):
    """Bad input from the user (files, images, landmarks, options); shown as one line, never a traceback."""


class OutputError(InputError):
    """Results could not be written (disk full, read-only or vanished folder); nothing half-written is left."""
