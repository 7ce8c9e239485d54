"""The one exception type that means "the user can fix this".

The CLI prints a LowbitError as a paragraph and exits non-zero; anything else is a bug and keeps its traceback.
"""


class LowbitError(Exception):
    """Bad input or an unusable environment, with a message that says what to do."""
