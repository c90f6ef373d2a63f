"""User-facing errors: one line that names the problem and the fix."""


class CodirError(Exception):
    """Raised for bad user input (config, data, checkpoints, launch arguments).

    Launchers catch it and print ``error: <message>`` without a traceback, so the
    message must say what is wrong and how to fix it, on one line.
    """
