"""The one exception type the command line turns into a one-line message and exit status 2."""
import sys


class UserError(Exception):
  """Bad input from the user: unknown name, invalid value, missing data.

  The message must name the problem and, where there is a finite set, the valid choices.
  `tlresearch.run` prints it on one line and exits with status 2 (no traceback).
  """


def shown(text) -> str:
  """`text` as printable text on one line: a byte of a name that is not UTF-8 (which Python
  keeps as a lone surrogate, "surrogateescape") shows as \\xNN, e.g. caf\\xe9, and a control
  character as its escape (\\n, \\t, \\x1b)."""
  import unicodedata
  text = str(text).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
  return "".join(c.encode("unicode_escape").decode("ascii")
                 if unicodedata.category(c) == "Cc" else c for c in text)


def choices(names) -> str:
  return ", ".join(sorted(str(n) for n in names))


def exit_with(main) -> None:
  """Exits with `main(sys.argv[1:])`'s status, or 2 after one `error:` line for a UserError
  (the small command-line tools; `tlresearch.run` adds logging and interrupts)."""
  try:
    code = main(sys.argv[1:])
  except UserError as e:
    print(f"error: {shown(e)}", file=sys.stderr)
    code = 2
  sys.exit(code)
