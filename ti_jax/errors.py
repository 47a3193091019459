"""The one base class of errors caused by the user's input.

Every error a user can fix (a bad config field, a missing image folder, an
unreadable embedding file, a run directory that belongs to another concept, ...)
derives from `UserError`. Entry points print such an error as one `error:` line
and exit non-zero; anything else is a bug and keeps its traceback.
"""


class UserError(ValueError):
  """Bad input from the user: shown as one line, never as a traceback."""
