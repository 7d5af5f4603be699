"""The one exception tree of supir-serve.

    SupirError                 base; `code` is a stable machine-readable string
     ├── InvalidInput          the caller's image or parameters are wrong (never retried)
     ├── WeightsError          checkpoint files missing, unreadable or of the wrong kind
     ├── SettingsError         speed or device settings that cannot work together (refused at start)
     ├── InferenceError        the model failed while running on valid input
     ├── Canceled              the caller asked to stop; raised between sampler steps
     └── StorageError          (jobs.storage: the service's object stores; the model never raises it)
          └── ObjectMissing

This module imports nothing heavy: the API process (which never imports torch) uses it too.
"""

from __future__ import annotations


class SupirError(Exception):
    """Base of every error supir-serve raises on purpose."""

    code = "supir_error"

    def __init__(self, message: str, *, code: str | None = None, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field  # the request field at fault, where there is one
        if code is not None:
            self.code = code


class InvalidInput(SupirError):
    code = "invalid_input"


class WeightsError(SupirError):
    code = "weights_error"


class SettingsError(SupirError):
    code = "invalid_settings"


class InferenceError(SupirError):
    code = "inference_error"


class Canceled(SupirError):
    code = "canceled"
