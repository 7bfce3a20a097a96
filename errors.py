"""The one exception the scripts turn into a sentence: a problem the user can fix."""


class UsageError(Exception):
    """A problem the user can fix (arguments, data, files): one sentence, exit code 2."""
