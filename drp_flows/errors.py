"""What a user got wrong, as opposed to what the code did: a site file, a name, a data query.
The command line prints such an error's message (which names the file, key or value) and
exits 2, without a traceback; anything else is a bug and keeps its traceback."""


class InputError(ValueError):
    """Input from a user that cannot be used; the message says which and why."""
