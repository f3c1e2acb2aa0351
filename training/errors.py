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


USER_ERRORS = (ConfigError, DataError, ModelError, TrainingDiverged, FileExistsError, FileNotFoundError)
