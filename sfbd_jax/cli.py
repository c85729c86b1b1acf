"""Command-line error reporting shared by the entry points (main, evaluate, annotate, prepare).

An error the project raises on purpose (bad config value, missing or damaged data, damaged
checkpoint, non-finite loss, an unknown ``--config.*`` key) ends the command with **one line**
on stderr — what is wrong, which key or file, what to do — and exit status 1. The traceback is
appended to ``<workdir>/errors.log`` when the command has a run directory, and printed too with
``--verbose_errors``. Anything else (a bug) propagates with its full traceback.
"""

from __future__ import annotations

import datetime
import importlib.util
import os
import sys
import traceback
from collections.abc import Callable

from absl import app, flags

flags.DEFINE_bool("verbose_errors", False,
                  "Print the full traceback of errors the project reports in one line.")

ERRORS_LOG = "errors.log"
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_OUR_DIRS = tuple(os.path.join(_ROOT, d) + os.sep for d in ("sfbd_jax", "configs"))
_REPORTED_TYPES = (ValueError, RuntimeError, ArithmeticError, OSError, LookupError, TypeError,
                   app.UsageError)


def is_reported_error(err: BaseException) -> bool:
    """True for an error raised on purpose by the project: one of the usual exception types,
    raised by a ``raise`` statement in sfbd_jax/ or configs/ (the innermost frame is ours)."""
    if not isinstance(err, _REPORTED_TYPES):
        return False
    frames = traceback.extract_tb(err.__traceback__)
    return bool(frames) and os.path.abspath(frames[-1].filename).startswith(_OUR_DIRS)


def one_line(err: BaseException) -> str:
    """The error's message on one line."""
    text = " ".join(str(err).split()) or type(err).__name__
    return f"{type(err).__name__}: {text}" if isinstance(err, (KeyError, TypeError)) else text


def _write_log(log_dir: str | None, err: BaseException) -> str | None:
    if not log_dir:
        return None
    try:
        os.makedirs(log_dir, exist_ok=True)
        path = os.path.join(log_dir, ERRORS_LOG)
        with open(path, "a") as f:
            f.write(f"--- {datetime.datetime.now().isoformat(timespec='seconds')} "
                    f"{' '.join(sys.argv)}\n")
            f.write("".join(traceback.format_exception(err)))
        return path
    except OSError:
        return None


def fail(message: str, log_path: str | None = None, traceback_hint: bool = True) -> None:
    """Print ``sfbd_jax: error: message`` (one line) and exit with status 1."""
    where = f"traceback in {log_path}" if log_path else "traceback with --verbose_errors"
    hint = f" [{where}]" if traceback_hint else ""
    print(f"sfbd_jax: error: {message}{hint}", file=sys.stderr, flush=True)
    sys.exit(1)


def _config_file(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def load_config_file(spec: str):
    """``get_config([arg])`` of a config file given as ``path[:arg]`` (as ``--config`` takes
    it), loaded directly rather than through the flag."""
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("_sfbd_config_file", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def unknown_config_key(argv: list[str]) -> str | None:
    """The first ``--config.a.b=...`` override in ``argv`` whose key the config file lacks (the
    file is loaded directly; None when all keys exist or it cannot be loaded)."""
    spec_text = _config_file(argv)
    if not spec_text:
        return None
    try:
        config = load_config_file(spec_text)
    except Exception:  # the parser reports a config file that cannot be loaded by itself
        return None
    for a in argv:
        if not a.startswith("--config."):
            continue
        key = a[len("--config."):].split("=", 1)[0]
        node = config
        for part in key.split("."):
            if not hasattr(node, "keys") or part not in node:
                return key
            node = node[part]
    return None


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing with one-line errors (unknown flag or config key, bad value)."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as err:
        fail(f"{one_line(err)} (see --helpfull)", traceback_hint=False)
    except Exception as err:  # ml_collections raises AttributeError/KeyError/TypeError
        key = unknown_config_key(argv)
        if key is not None:
            config_file = _config_file(argv)
            fail(f"unknown config key '{key}' (in --config.{key}=...): {config_file} has no "
                 "such key; check its spelling against the config file", traceback_hint=False)
        fail(f"cannot read the config or its --config.* overrides: {one_line(err)}")
    raise AssertionError("unreachable")


def run(main: Callable[[list[str]], object], log_dir: Callable[[], str | None]) -> None:
    """``app.run(main)`` with one-line errors; ``log_dir()`` names where errors.log goes."""

    def guarded(argv: list[str]) -> None:
        try:
            main(argv)
        except Exception as err:
            if not is_reported_error(err):
                raise
            try:
                directory = log_dir()
            except Exception:  # a missing flag or config key must not hide the real error
                directory = None
            path = _write_log(directory, err)
            if flags.FLAGS.verbose_errors:
                traceback.print_exception(err)
            fail(one_line(err), path)

    app.run(guarded, flags_parser=parse_flags)
