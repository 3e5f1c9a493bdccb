"""Dotted paths into ConfigDicts, and identities made of explicit field lists.

A result's identity (a cell's, a cached backbone's) is the values of the fields that decide
it, listed by the module that owns the result, plus that list's version. A key that only
changes how a run is carried out (checkpointing, devices, how seeds are batched) is simply
not listed, so adding one never changes an identity.
"""
from __future__ import annotations

import hashlib
import json

import ml_collections

from tlresearch.core.errors import UserError

MISSING = "<missing>"  # a listed field a saved config lacks: it can never match a present one


def get_path(cfg, dotted: str):
  """cfg['a']['b'] for 'a.b'; UserError naming the key when it does not exist."""
  node = cfg
  for part in dotted.split("."):
    if not isinstance(node, (ml_collections.ConfigDict, dict)) or part not in node:
      raise UserError(f"'{dotted}' is not a config key")
    node = node[part]
  return node


def set_path(cfg, dotted: str, value) -> None:
  """cfg['a']['b'] = value for 'a.b' (the ConfigDict keeps the key's type)."""
  *parents, leaf = dotted.split(".")
  node = cfg
  for p in parents:
    node = node[p]
  try:
    node[leaf] = value
  except TypeError as e:
    raise UserError(f"value {value!r} for '{dotted}' has the wrong type ({e})") from None


def _plain(value):
  return json.loads(json.dumps(value.to_dict() if hasattr(value, "to_dict") else value))


def pick(config, fields: tuple[str, ...], version: int, defaults: dict | None = None) -> dict:
  """{'version': version, field: value} for each dotted field of `config` (a ConfigDict or
  its dict); a field the config lacks gets MISSING. A field of `defaults` ({dotted: value})
  is left out while it is absent or at that value: a field added later then leaves every
  earlier identity as it was, and counts as soon as it is set to anything else. A default
  may also name a key inside a listed field (`model.head` when `model` is listed)."""
  out = {"version": version}
  for dotted in fields:
    try:
      out[dotted] = _plain(get_path(config, dotted))
    except UserError:
      out[dotted] = MISSING
  for dotted, value in (defaults or {}).items():
    inside = [f for f in fields if dotted.startswith(f + ".")]
    if inside:  # a key within a listed field's value: drop it there while at its default
      *parents, leaf = dotted[len(inside[0]) + 1:].split(".")
      node = out[inside[0]]
      for p in parents:
        node = node.get(p) if isinstance(node, dict) else None
      if isinstance(node, dict) and leaf in node and node[leaf] == value:
        del node[leaf]
      continue
    try:
      got = _plain(get_path(config, dotted))
    except UserError:
      continue
    if got != value:
      out[dotted] = got
  return out


def digest(identity: dict) -> str:
  return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def configuration(axes: dict) -> str:
  """The configuration a cell belongs to: every axis but the seed (a table row on one
  target). Its seeds are paired, and selection chooses one lr / weight decay for all of
  them, so a configuration is the unit that selection and sharding keep together."""
  return json.dumps({k: v for k, v in axes.items() if k != "seed"}, sort_keys=True, default=str)
