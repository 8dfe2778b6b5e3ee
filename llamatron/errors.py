class LlamatronError(Exception):
    """A user-facing error: the CLI prints its message on one line and exits non-zero, no traceback.

    The message names the culprit (file and line, config key, ...) and what was expected.
    """
