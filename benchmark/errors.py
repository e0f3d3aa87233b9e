"""Error types. Every message names the offending input and the command or change that fixes it."""


class InvarbenchError(Exception):
    """Base class for errors caused by bad input; the CLI prints them and exits with status 1."""


class DataError(InvarbenchError):
    """A data set is missing, corrupt or in an unsupported format."""


class ModelError(InvarbenchError):
    """A model name, card or checkpoint cannot be used."""


class ConfigError(InvarbenchError):
    """An option or specification (threat model, attack name, eps, ...) is invalid."""


def did_you_mean(name: str, choices, *, cutoff: float = 0.6) -> str:
    """`` Did you mean a, b?`` for the choices close to ``name``, or an empty string."""
    import difflib

    close = difflib.get_close_matches(name, list(choices), n=3, cutoff=cutoff)
    return f" Did you mean {', '.join(close)}?" if close else ""
