"""Errors a caller can act on. Each names the offending field or path and what would be valid."""

from __future__ import annotations


class KVRelayError(Exception):
    """Base class for every error kvrelay raises on purpose."""


class InvalidRequestError(KVRelayError, ValueError):
    """A request parameter is out of range; `param` names the field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class ModelLoadError(KVRelayError):
    """A weights path is missing, unreadable, or not a format we load."""


class KVTransferError(KVRelayError):
    """Pulling KV from a prefill worker failed (it is gone, its lease expired, the link broke): the
    decode worker is fine, and the request can be prefilled again elsewhere."""


class CacheFullError(KVRelayError):
    """The KV cache has no room for this now (an import, an allocation): free blocks are short."""


class UnknownRequestError(KVRelayError, KeyError):
    """A request id the engine does not know (finished, released or never submitted)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown request"


class EngineStoppedError(KVRelayError):
    """A call reached an engine that has shut down (its model was evicted, or the worker is stopping)."""


class PermissionDeniedError(KVRelayError):
    """A caller presented a credential that does not hold: a forged, altered or expired KV handle."""


class ModelNotFoundError(ModelLoadError):
    """No model of that id (or version) is in the model repository; the message lists what is."""


class ModelIntegrityError(ModelLoadError):
    """A repository model's files no longer match the SHA-256 digests recorded when it was added."""


class ModelExistsError(KVRelayError):
    """That id and version is already in the model repository; versions are never overwritten."""


class InvalidModelNameError(KVRelayError, ValueError):
    """A model id or version breaks the naming rule (they become directory names)."""
