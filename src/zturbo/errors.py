"""One error hierarchy: each error carries the message a user sees and its HTTP status."""

from __future__ import annotations


class ZTurboError(Exception):
    """Base of every error zturbo raises on purpose; `str(err)` is the user-facing message."""

    http_status: int = 500
    kind: str = "internal_error"

    def to_dict(self) -> dict[str, str]:
        return {"error": str(self), "type": self.kind}


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
