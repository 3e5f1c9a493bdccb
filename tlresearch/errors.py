"""The one exception type the command line turns into a one-line message and exit status 2."""


class UserError(Exception):
  """Bad input from the user: unknown name, invalid value, missing data.

  The message must name the problem and, where there is a finite set, the valid choices.
  `tlresearch.run` prints it on one line and exits with status 2 (no traceback).
  """


def choices(names) -> str:
  return ", ".join(sorted(str(n) for n in names))
