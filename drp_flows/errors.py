"""What a user got wrong, as opposed to what the code did: a site file, a name, a data query.
The command line prints such an error's message (which names the file, key or value) and
exits 2, without a traceback; anything else is a bug and keeps its traceback."""


class InputError(ValueError):
    """Input from a user that cannot be used; the message says which and why."""


class DataError(Exception):
    """Data a quantum cannot process (a bad raw, too few stars, a fit that cannot converge):
    the quantum is quarantined with this message and the rest of the campaign goes on. Any
    other exception in a quantum is a bug, and fails its group loudly."""


class CorruptInput(DataError):
    """An input file that is missing, cannot be read or parsed, or whose checksum differs
    from the one recorded when it was made."""
