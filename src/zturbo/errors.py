"""One error hierarchy: each error carries the message a user sees and its HTTP status."""

from __future__ import annotations

from typing import ClassVar


class ZTurboError(Exception):
    """Base of every error zturbo raises on purpose; `str(err)` is the user-facing message."""

    http_status: int = 500
    kind: str = "internal_error"


class InvalidRequestError(ZTurboError, ValueError):
    """A generation parameter is outside what is allowed; the message names value and range."""

    http_status = 400
    kind = "invalid_request"


class ModelNotFoundError(ZTurboError):
    """The model directory or hub repository cannot be found or reached."""

    http_status = 404
    kind = "model_not_found"


class CheckpointError(ZTurboError):
    """A checkpoint exists but is incomplete or corrupt; the message names the file."""

    http_status = 500
    kind = "checkpoint_error"


class OutputExistsError(ZTurboError, FileExistsError):
    """Refusing to overwrite an existing output file."""

    http_status = 409
    kind = "output_exists"


class DeviceError(ZTurboError):
    """The requested device or dtype is not available on this machine."""

    http_status = 400
    kind = "device_error"


class PrecisionError(ZTurboError):
    """A component produced non-finite values even in float32."""

    http_status = 500
    kind = "precision_error"


class GPUMemoryError(ZTurboError):
    """A request does not fit in GPU memory even after the recovery zturbo can do."""

    http_status = 507
    kind = "out_of_memory"


class StorageError(ZTurboError):
    """Output or state could not be written or read: a full disk, a permission, a damaged file.
    The message names the path and the cause."""

    http_status = 507
    kind = "storage"


class StoreBusyError(StorageError):
    """The job database stayed locked by another process past its wait: nothing was changed; the
    same request can be sent again."""

    http_status = 503
    kind = "store_busy"
    retry_after = 5


# --- the server and its job queue ----------------------------------------------------------


class QueueFullError(ZTurboError):
    """The bounded queue holds as many jobs as allowed; retry later."""

    http_status = 429
    kind = "queue_full"

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class JobNotFoundError(ZTurboError):
    http_status = 404
    kind = "not_found"


class JobConflictError(ZTurboError):
    """The job is not in a state that allows the operation (e.g. cancelling a finished job)."""

    http_status = 409
    kind = "conflict"


class LoraError(InvalidRequestError):
    """A LoRA that cannot be used: not found, outside the LoRA directory, made for another model,
    or with keys that do not map onto the transformer; the message names the file and the keys."""

    kind = "invalid_lora"


class FieldError(InvalidRequestError):
    """Bad input in one named field."""

    def __init__(self, field: str | None, message: str) -> None:
        super().__init__(message)
        self.field = field


class UnauthorizedError(ZTurboError):
    http_status = 401
    kind = "unauthorized"


class NotReadyError(ZTurboError):
    http_status = 503
    kind = "not_ready"


class SyncTimeoutError(ZTurboError):
    """The synchronous API waited its limit; the job goes on and can be polled."""

    http_status = 504
    kind = "timeout"


class JobFailedError(ZTurboError):
    """A synchronous (OpenAI-style) request whose job failed; status follows the job's error."""

    STATUS: ClassVar[dict[str, int]] = {
        "out_of_memory": 507,
        "timeout": 504,
        "invalid_request": 400,
        "invalid_lora": 400,
        "cancelled": 409,
    }

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.http_status = self.STATUS.get(kind, 500)
