"""Errors users see. Each message names the problem and how to fix it."""


class MixDQError(Exception):
    """Base class for every error mixdq raises on purpose."""


class PlanError(MixDQError, ValueError):
    """A plan is malformed or does not fit the model."""


class BudgetError(MixDQError, ValueError):
    """No plan fits the requested memory budget."""


class ModelNotFoundError(MixDQError, FileNotFoundError):
    """A model source could not be found locally and cannot be downloaded."""


class GPUJobError(MixDQError):
    """A step would run for days on this device (the sensitivity analysis of an SDXL-size
    model on a CPU); the message says what to use instead."""


class ExportError(MixDQError):
    """An exported folder could not be written or read back."""


class SlowPathWarning(UserWarning):
    """A quantized model will run slower than it could on this machine (the message says why
    and what to do); the app shows it next to the model."""
