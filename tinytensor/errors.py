"""The one base of every error a user causes and can fix: a damaged or hostile file, a wrong
path, an option or a request out of range. Its message is one line saying what is wrong and what
to do, so a command catches this type (with ValueError and OSError from the standard library and
the API's own argument checks) and prints the message: no traceback."""


class UserError(Exception):
    """Something the user gave cannot be used; the message says what and what to do."""
