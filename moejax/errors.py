"""The one exception type users see: a message that names the problem."""


class MoejaxError(Exception):
    """A problem with the user's input (file, tensor, shape, flag), reported in one line.

    The CLI prints the message and exits with status 2; the Python API raises it as is.
    """
