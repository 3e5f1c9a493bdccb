"""Atomic file writes: a reader never sees a half-written file."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile

from tlresearch.core.errors import UserError, shown


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


_UMASK = _umask()


def shareable_tmpdir(parent: str, prefix: str) -> str:
  """A temporary folder in `parent` with normal permissions (mkdtemp makes 0700), to be
  renamed into place once complete."""
  tmp = tempfile.mkdtemp(dir=parent, prefix=prefix)
  os.chmod(tmp, 0o777 & ~_UMASK)
  return tmp


def write_text(path: str, text: str) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".tmp-")
  try:
    with os.fdopen(fd, "w") as f:
      f.write(text)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; a results file is meant to be shared
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def write_json(path: str, obj) -> None:
  write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_default) + "\n")


def write_jsonl(path: str, records) -> None:
  write_text(path, "".join(json.dumps(r, sort_keys=True, default=_default) + "\n"
                           for r in records))


def read_jsonl(path: str) -> list:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def read_json(path: str):
  with open(path) as f:
    return json.load(f)


def _default(o):
  if hasattr(o, "item"):
    return o.item()
  if hasattr(o, "tolist"):
    return o.tolist()
  raise TypeError(f"not JSON serialisable: {type(o).__name__}")


class FileLock:
  """An exclusive inter-process lock, held until `release` or the end of the process.

  `flock` on a lock file: the kernel drops it when the holder exits, however it exits
  (SIGKILL included), so a killed sweep never leaves a stale lock. The holder's pid is
  written into the file only to make a refusal message useful.
  """

  def __init__(self, path: str):
    self.path = path
    self._fd = None

  def acquire(self, blocking: bool = False, shared: bool = False) -> bool:
    """`shared`: any number of shared holders at once, none while an exclusive one holds it
    (the tasks of a sharded grid share the workdir; a whole-grid sweep needs it alone)."""
    import fcntl
    os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
    try:
      fcntl.flock(fd, mode | (0 if blocking else fcntl.LOCK_NB))
    except BlockingIOError:
      os.close(fd)
      return False
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    self._fd = fd
    return True

  def holder(self) -> str:
    try:
      with open(self.path) as f:
        return f.read().strip() or "unknown"
    except OSError:
      return "unknown"

  def release(self) -> None:
    if self._fd is not None:
      os.close(self._fd)  # closing the descriptor releases the flock
      self._fd = None


@contextlib.contextmanager
def atomic_dir(path: str):
  """Yields a temporary sibling folder to fill; when the block ends without an error the
  folder replaces `path` whole (`replace_dir`), otherwise it is deleted."""
  import shutil
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  tmp = shareable_tmpdir(parent, f".tmp-{os.path.basename(path)}-")
  try:
    yield tmp
    replace_dir(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def directory_lock(directory: str) -> FileLock:
  """The lock of a sweep's workdir: `<workdir>/.lock`."""
  return FileLock(os.path.join(directory, ".lock"))


def task_lock(directory: str, name: str, task_index: int, num_tasks: int) -> FileLock:
  """The lock of one task of experiment `name`'s sharded grid:
  `<workdir>/.lock-NAME-task-I-of-N`, so that two processes started with the same task
  index never run the same cells at once."""
  return FileLock(os.path.join(directory, f".lock-{name}-task-{task_index}-of-{num_tasks}"))


def replace_dir(tmp: str, path: str) -> None:
  """Moves folder `tmp` to `path`, replacing any folder there, with no moment at which a
  reader finds a mix of old and new files (at worst, briefly, no folder at all)."""
  import shutil
  old = None
  if os.path.exists(path):
    old = tempfile.mkdtemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".old-")
    os.replace(path, os.path.join(old, "d"))
  os.replace(tmp, path)
  if old is not None:
    shutil.rmtree(old, ignore_errors=True)


def check_writable(path: str, what: str) -> None:
  """UserError naming `what` and the path unless folder `path` can be written, or created
  and written: a file in the way, a read-only or full disk. Creates nothing: a missing
  folder is checked at its nearest existing parent."""
  probe_dir = os.path.abspath(path)
  while not os.path.exists(probe_dir):
    probe_dir = os.path.dirname(probe_dir)
  if not os.path.isdir(probe_dir):
    raise UserError(f"{what} {path}: {probe_dir} exists and is not a folder")
  if not os.access(probe_dir, os.W_OK | os.X_OK):
    raise UserError(f"{what} {path} is not writable ({probe_dir}: permission denied)")
  try:
    fd, probe = tempfile.mkstemp(dir=probe_dir, prefix=".write-check-")
    os.close(fd)
    os.unlink(probe)
  except OSError as e:
    raise UserError(f"{what} {path} is not writable ({probe_dir}: {e.strerror or e})") from None


def os_error_line(e: OSError) -> str:
  """One line for an operating-system failure: what failed, and on which path."""
  paths = " -> ".join(str(p) for p in (e.filename, e.filename2) if p)
  return f"{e.strerror or type(e).__name__}" + (f": {paths}" if paths else f" ({e})")


@contextlib.contextmanager
def signals_deferred():
  """Ctrl-C and SIGTERM wait until the block ends, then act as they would have: a save whose
  background threads (Orbax's) are cut short dies noisily at interpreter exit."""
  import signal
  import threading
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  received = []
  old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
  for s in old:
    signal.signal(s, lambda signum, frame: received.append(signum))
  try:
    yield
  finally:
    for s, handler in old.items():
      signal.signal(s, handler)
    if received:
      signum, handler = received[0], old[received[0]]
      if callable(handler):
        handler(signum, None)
      elif handler == signal.SIG_DFL:
        if signum == signal.SIGINT:
          raise KeyboardInterrupt
        os.kill(os.getpid(), signum)


def not_utf8(name: str) -> bool:
  """Whether `name` (as the OS gave it) holds a byte that is not UTF-8: Python keeps such a
  byte as a lone surrogate ("surrogateescape"), which no UTF-8 file or terminal accepts."""
  return any("\udc80" <= ch <= "\udcff" for ch in str(name))


def check_utf8(name: str, what: str) -> None:
  """UserError naming `what` unless `name` is UTF-8 text: names the project writes into
  configs, tables, cell folders and kept models must be text, never raw bytes."""
  if not_utf8(name):
    raise UserError(f"{what} '{shown(name)}' is not a UTF-8 name (\\xNN marks the byte that is "
                    "not): rename it, e.g. convmv -f latin1 -t utf-8, or link it under a "
                    "UTF-8 name")


def check_name_text(name: str, what: str) -> None:
  """`check_utf8`, and UserError when `name` holds a control character (a newline in a class
  folder's name would split every table row and message line it appears in)."""
  import unicodedata
  check_utf8(name, what)
  if any(unicodedata.category(c) == "Cc" for c in str(name)):
    raise UserError(f"{what} '{shown(name)}' holds a control character: rename it")


def save_figure(fig, path: str) -> None:
  """`fig` as a PNG at `path`, written whole or not at all (a temporary file, renamed), and
  closed."""
  import matplotlib.pyplot as plt
  tmp = path + ".tmp.png"
  fig.savefig(tmp, dpi=120)
  plt.close(fig)
  os.replace(tmp, path)


def home() -> str:
  """The user's home folder ($HOME, else the password database's), or UserError: without
  one, "~/.cache" would become a folder named "~" wherever the command runs."""
  path = os.path.expanduser("~")  # an empty $HOME expands to "/"
  if os.environ.get("HOME") == "" or not os.path.isabs(path):
    raise UserError("no home folder: $HOME is not set (or empty) and the user has none in the "
                    "password database; set HOME, or TLRESEARCH_DATA_DIR and "
                    "TLRESEARCH_CACHE_DIR to folders")
  check_utf8(path, "the home folder")
  return path


def env_folder(var: str, *under_home: str) -> str:
  """The folder $`var` names, or home()/`under_home` when it is unset or empty; UserError
  naming the variable when it names something that is not a folder."""
  value = os.environ.get(var)
  if not value:
    return os.path.join(home(), *under_home)
  check_utf8(value, f"${var}")
  path = os.path.abspath(os.path.expanduser(value))
  if os.path.exists(path) and not os.path.isdir(path):
    raise UserError(f"${var}={value} is not a folder: point it at a folder, or unset it for "
                    f"~/{'/'.join(under_home)}")
  return path
