"""Errors that wren reports to users as one line, without a traceback."""


class UserError(Exception):
    """A problem with what the user gave wren (config, data, checkpoint, arguments)."""

    exit_code = 1


class ConfigError(UserError):
    """A config key or value is wrong; the message starts with the dotted key."""

    exit_code = 2


class NonFiniteError(UserError):
    """Training produced non-finite losses or gradients for too many steps in a row."""

    exit_code = 3
