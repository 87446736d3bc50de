"""Errors raised by LoGo.

Every error is a :class:`LoGoError`; each subclass also inherits the builtin that a caller would
naturally catch (``KeyError`` for an unknown adapter name, ``ValueError`` for a bad value,
``OSError`` for a file that cannot be read), following peft and the standard library.
"""

from __future__ import annotations


class LoGoError(Exception):
    """Base class of every error raised by LoGo."""


class ModelLoadError(LoGoError, OSError):
    """The base model or its tokenizer could not be loaded."""


class AdapterLoadError(LoGoError, OSError):
    """An adapter's files are missing, unreadable, truncated or in a refused format."""


class UnsafeAdapterError(AdapterLoadError):
    """An adapter ships pickle (``.bin``) weights and the caller did not pass ``allow_pickle``."""


class AdapterIncompatibleError(LoGoError, ValueError):
    """An adapter is not a plain LoRA adapter, or does not fit the base model (modules, shapes)."""


class AdapterNotFoundError(LoGoError, KeyError):
    """An adapter name that the library does not hold."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class RoutingConfigError(LoGoError, ValueError):
    """A :class:`~logo_engine.RoutingConfig` value is out of range or does not fit the model."""


class InvalidRequestError(LoGoError, ValueError):
    """A malformed request: empty prompt, unknown role, bad mixture weights or sampling values."""


class ContextLengthError(InvalidRequestError):
    """The prompt (plus ``max_new_tokens``) does not fit the model's context window."""


class GenerationError(LoGoError, RuntimeError):
    """Generation failed inside the model; the engine is left usable."""


class NumericalError(GenerationError):
    """The model or a scorer produced NaN or infinite values (scores or logits)."""


class EngineClosedError(LoGoError, RuntimeError):
    """A call on an engine after :meth:`~logo_engine.LoGoEngine.close`."""


class AdapterMemoryError(AdapterLoadError, MemoryError):
    """Loading these adapters would exceed the engine's adapter memory budget."""


class ExportError(LoGoError, OSError):
    """A mixture could not be written as a LoRA folder (target exists, disk full, ...)."""


class MixtureRankError(InvalidRequestError):
    """A mixture served as one LoRA needs a larger rank than the serving engine allows.

    The message says the rank needed, the serving engine's limit and the value to start it with.
    """


class ModelNotFoundError(LoGoError, KeyError):
    """A request names a model that the server does not serve."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class AuthenticationError(LoGoError, PermissionError):
    """A LoGo server refused the request's API key (HTTP 401)."""


class RemoteError(LoGoError, ConnectionError):
    """A LoGo server could not be reached, is still loading, or failed (HTTP 5xx)."""
