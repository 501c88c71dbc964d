"""User-facing errors: one clear message that says what to do."""


class AwqnbError(Exception):
    """An error caused by the user's input or environment, shown without a traceback.

    The message must say what went wrong and what to do about it.
    """
