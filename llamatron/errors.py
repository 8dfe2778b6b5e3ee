class LlamatronError(Exception):
    """A user-facing error: the CLI prints its message on one line and exits non-zero, no traceback.

    The message names the culprit (file and line, config key, ...) and what was expected.
    """


# Exit status of a run that stopped early on request (SIGTERM/SIGUSR1: pre-emption, wall-clock limit)
# after writing a complete checkpoint: sysexits' EX_TEMPFAIL, "try again later". Launchers requeue on
# it; any other non-zero status is a failure that a requeue would only repeat.
REQUEUE_EXIT_CODE = 75
