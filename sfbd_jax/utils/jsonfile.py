"""Small JSON records in a run directory, written atomically (a kill never leaves half a file)."""

from __future__ import annotations

import json
import os
from typing import Any


def read_json(path: str, default: Any) -> Any:
    """The JSON value stored at ``path``, or ``default`` when there is no file."""
    if not os.path.exists(path):
        return default
    with open(path) as f:
        return json.load(f)


def write_json(path: str, value: Any) -> None:
    """Write ``value`` to ``path`` (parent folders created) through a temporary file and an
    atomic rename."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=1, sort_keys=True)
    os.replace(tmp, path)
