"""Error types. Every message names the offending input and the command or change that fixes it."""


class InvarbenchError(Exception):
    """Base class for errors caused by bad input; the CLI prints them and exits with status 1."""


class DataError(InvarbenchError):
    """A data set is missing, corrupt or in an unsupported format."""


class ModelError(InvarbenchError):
    """A model name, card or checkpoint cannot be used."""


class ConfigError(InvarbenchError):
    """An option or specification (threat model, attack name, eps, ...) is invalid."""
