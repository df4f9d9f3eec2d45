class UserError(Exception):
    """A problem with what the user asked for or handed us.

    The CLI prints it as one line, ``error: <message>``, and exits with status 2.
    """
