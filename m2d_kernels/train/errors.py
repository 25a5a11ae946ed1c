"""The error of a setting the training loop cannot run with, naming the setting."""

from __future__ import annotations


class ConfigError(ValueError):
    """A bad value of the :class:`~m2d_kernels.train.loop.TrainConfig` field ``field``.

    ``str(error)`` is ``"<field> <detail>"`` (e.g. ``batch_size must be >= 1, got 0``) for library callers;
    ``m2d-train`` prints ``detail`` after the field's flag instead (``--batch-size must be >= 1, got 0``).
    """

    def __init__(self, field: str, detail: str) -> None:
        super().__init__(f"{field} {detail}")
        self.field = field
        self.detail = detail
