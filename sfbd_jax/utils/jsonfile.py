"""Small JSON records in a run directory, written atomically (a kill never leaves half a file)."""

from __future__ import annotations

import json
import os
from typing import Any


def read_json(path: str, default: Any) -> Any:
    """The JSON value stored at ``path``, or ``default`` when there is no file.

    Raises ValueError naming ``path`` when the file is there but is not JSON (hand-edited, or
    cut short by a copy), rather than reading it as missing."""
    if not os.path.exists(path):
        return default
    with open(path) as f:
        text = f.read()
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); mend or remove it (it is a run "
                         "record: removing it makes the run forget what it recorded)") from e


def write_json(path: str, value: Any, indent: int = 1) -> None:
    """Write ``value`` to ``path`` (parent folders created, keys sorted, ``indent`` spaces)
    through a temporary file and an atomic rename."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=indent, sort_keys=True)
    os.replace(tmp, path)
