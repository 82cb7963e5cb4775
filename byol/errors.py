"""The one exception type that means "the user asked for something impossible".

`main.py` turns a `UserError` into a single `error: ...` line and exit status 2.
Anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
  """Bad input: a config, a dataset or a checkpoint the run cannot use."""


class ConfigError(UserError, ValueError):
  """A config field has an impossible value."""
