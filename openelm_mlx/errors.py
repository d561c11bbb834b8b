"""Errors a user can act on. The CLI prints these as one line, without a traceback."""


class OpenELMError(Exception):
    """Base class for expected, user-facing errors."""


class ConfigError(OpenELMError, ValueError):
    """config.json is missing a field or contradicts itself."""


class LoadError(OpenELMError):
    """A checkpoint could not be found, fetched or read."""


class TokenizerNotFoundError(LoadError):
    """No SentencePiece tokenizer was found for a checkpoint."""


class ContextLengthError(OpenELMError, ValueError):
    """A prompt does not fit in the model's context."""


class InvalidOptionError(OpenELMError, ValueError):
    """A generation option is out of range."""


class ConstraintError(OpenELMError, ValueError):
    """A structured-output constraint (JSON schema, regex, choice, grammar) is invalid or cannot be enforced."""


class TaskDataError(OpenELMError):
    """An evaluation task is unknown, or its data could not be fetched (offline)."""
