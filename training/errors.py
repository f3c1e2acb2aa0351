"""The trainer's user-facing errors: each names the config key or file and what was expected.

`python -m training.run` prints them as one line and exits with code 2.
"""


class ConfigError(ValueError):
    """A config key has a bad value (the message names the dotted key)."""


class DataError(ValueError):
    """A dataset problem the user must fix; the message names the config key or file."""


class ModelError(ValueError):
    """The base model cannot be loaded (the message names `model.base` and what was expected)."""


class TrainingDiverged(RuntimeError):
    """A loss became NaN or inf: the run stops there (nothing non-finite is exported); the message names
    the stage, the step and the value, and the settings to lower."""


class CheckpointError(ValueError):
    """A --resume folder that is not a checkpoint this trainer wrote (or does not fit the config); the message
    names the folder and the file. Nothing in it has been loaded."""


class WriteError(RuntimeError):
    """An output could not be written (disk full, no permission); the message names the path."""


USER_ERRORS = (ConfigError, DataError, ModelError, TrainingDiverged, CheckpointError, WriteError, FileExistsError,
               FileNotFoundError)
