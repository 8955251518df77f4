"""One family of errors. Each message says what was wrong and what to do about it.

The CLI prints ``str(error)`` on one line and exits non-zero; library users catch
:class:`KpfaceError` (or one of the narrower classes below).
"""


class KpfaceError(Exception):
    """Base class of every error kpface raises on purpose."""

    exit_code = 2


class InputError(KpfaceError):
    """An image or argument the user gave cannot be used."""


class ModelError(KpfaceError):
    """A model directory is missing files, corrupt, tampered with, or of the wrong kind."""


class CheckpointError(KpfaceError):
    """A checkpoint cannot be read or does not match the architecture."""


class EngineUnavailable(KpfaceError):
    """A runtime engine is not installed or cannot run on this machine."""


class AccuracyGateError(KpfaceError):
    """A build lost too much accuracy against the fp32 model."""

    exit_code = 3


class RandomWeightsError(KpfaceError):
    """An identity verdict was asked of a model with random (or partly random) weights.

    The similarity can still be shown; the same/different or identity answer is refused unless
    the caller says it knows (``--allow-random``, ``allow_random=True``)."""

    exit_code = 4
