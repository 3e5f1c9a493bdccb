"""Atomic file writes: a reader never sees a half-written file."""
from __future__ import annotations

import json
import os
import tempfile


def write_text(path: str, text: str) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".tmp-")
  try:
    with os.fdopen(fd, "w") as f:
      f.write(text)
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


def read_json(path: str):
  with open(path) as f:
    return json.load(f)


def _default(o):
  if hasattr(o, "item"):
    return o.item()
  if hasattr(o, "tolist"):
    return o.tolist()
  raise TypeError(f"not JSON serialisable: {type(o).__name__}")
