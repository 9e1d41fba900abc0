"""The error text of ``rnndrop fit``: one ``error:`` line per user error (issue 21 gave it this
module; :mod:`rnndrop.lit.cli` raises through it).

jsonargparse reports a bad key or value as a multi-line dump of every union member it tried;
:func:`summarize` turns that into its innermost reasons, where the value was set (``FILE: KEY``
or ``--KEY``, read back from the command line, :func:`set_argv`) and a "did you mean" for an
unknown key; :func:`fail` prints the line and exits with code 2.
"""

from __future__ import annotations

import difflib
import inspect
import re
import sys
from importlib import import_module
from pathlib import Path
from typing import Any, NoReturn

__all__ = ["cli_spelling", "fail", "set_argv", "summarize"]

# ---- where a setting came from, and what went wrong ----------------------------------------

#: the command line being parsed, so that an error can say which file or option set a key
_ARGV: list[str] = []


def set_argv(argv: list[str]) -> list[str]:
    """Remember the command line being parsed (a copy, returned) for the errors about it."""
    global _ARGV
    _ARGV = list(argv)
    return _ARGV


_NOISE = ("Does not validate against any of the Union subtypes", "Subtypes:", "Errors:",
          "Given value", "Expected a <class", "Parser key", "Problem with given class_path",
          "Input: ")  # fmt: skip


def _flatten(data: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if not isinstance(data, dict):
        return [(prefix, data)] if prefix else []
    out = [(prefix, data)] if prefix else []
    for k, v in data.items():
        out += _flatten(v, f"{prefix}.{k}" if prefix else str(k))
    return out


def _sources(argv: list[str]) -> list[tuple[str, str, Any]]:
    """``(where, dotted key, value)`` for every setting the user gave, in the order they apply."""
    import yaml

    out: list[tuple[str, str, Any]] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("-"):
            i += 1
            continue
        key, eq, value = arg.lstrip("-").partition("=")
        if not eq:
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            value = nxt if nxt is not None and not nxt.startswith("--") else None
            i += 1 if value is None else 2
        else:
            i += 1
        if key in ("c", "config"):
            try:
                data = yaml.safe_load(Path(value).read_text())
            except Exception:  # an unreadable config has its own parser error
                continue
            out += [(str(value), k, v) for k, v in _flatten(data)]
        else:
            out.append((f"--{key}", key, value))
    return out


def _locate(message: str, names: list[str]) -> tuple[str, str] | None:
    """The last setting the message is about: its key is named in ``names`` (unknown keys) or
    its value appears in the message."""
    best, best_score = None, 0
    for where, key, value in reversed(_sources(_ARGV)):
        leaf = key.rsplit(".", 1)[-1]
        score = 4 if leaf in names or key in names else 0
        text = None if value is None or isinstance(value, dict) else str(value)
        if text and len(text) > 1 and re.search(rf"(?<![\w.]){re.escape(text)}(?![\w])", message):
            score += 2
            if re.search(rf"\b{re.escape(leaf)}\b", message):
                score += 1
        if score > best_score:
            best, best_score = (where, key), score
    return best


def _did_you_mean(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def summarize(message: str, usage: str = "") -> str:
    """One line for a parser or class error: the innermost reasons, where the value was set
    (``FILE: KEY`` or ``--KEY``), and a "did you mean" for an unknown key."""
    hints, names = [], []
    # an unknown init argument of a class: "Problem with given class_path 'C':\n Option 'x'..."
    for cls_path, name in re.findall(
        r"class_path '([\w.]+)':\s*\n\s*Option '(\w+)' is not accepted", message
    ):
        names.append(name)
        try:
            module, _, attr = cls_path.rpartition(".")
            params = list(inspect.signature(getattr(import_module(module), attr)).parameters)
        except Exception:
            params = []
        hints.append(f"unknown key {name!r} for {cls_path.rsplit('.', 1)[-1]}"
                     + _did_you_mean(name, params))  # fmt: skip
    # an unknown option of the parser: "does not accept option 'trainer.max_stepz'"
    for name in re.findall(r"does not accept option '([\w.]+)'", message):
        names.append(name)
        options = re.findall(r"--([\w.]+)", usage)
        hints.append(f"unknown key {name!r}" + _did_you_mean(name, options))
    for args in re.findall(r"(?i)unrecognized arguments: (.*)", message):
        options = re.findall(r"--([\w.]+)", usage)
        for name in re.findall(r"--([\w.]+)", args):
            names.append(name)
            hints.append(f"unknown option --{name}" + _did_you_mean(name, options))
    # the key a type error is about: 'Parser key "trainer.max_steps":'
    names += re.findall(r'Parser key "([\w.]+)"', message)
    if not hints:
        expected = []
        for line in message.splitlines():
            text = line.strip().removeprefix("- ").strip()
            if text.startswith("Expected a <class") and "NoneType" not in text:
                expected.append(text)
            elif text and not text.startswith(_NOISE) and text not in hints:
                hints.append(text)
        hints = hints or expected  # a plain type error: "Expected a <class 'int'>. Got ..."
    # dataclass fields (RecurrentDropout and kin): "unknown field(s) ['x']; valid fields are [...]"
    fields_error = r"unknown field\(s\) \[([^\]]*)\]; valid fields are \[([^\]]*)\]"
    for unknown, valid in re.findall(fields_error, message):
        fields = re.findall(r"'(\w+)'", valid)
        for name in re.findall(r"'(\w+)'", unknown):
            names.append(name)
            hint = _did_you_mean(name, fields).removeprefix("; ")
            if hint:
                hints.append(f"{name!r}: {hint}")
    what = "; ".join(hints) or message.strip().splitlines()[0]
    where = _locate(what if not names else message, names)
    if where is None:
        return what
    source, key = where
    return f"{source}: {what}" if source.startswith("--") else f"{source}: {key}: {what}"


def fail(message: str) -> NoReturn:
    """Print one ``error:`` line and exit with code 2 (argparse's code for a usage error)."""
    sys.stderr.write("error: " + " ".join(message.split()) + "\n")
    raise SystemExit(2)


def cli_spelling(message: str) -> str:
    """A data-module message in the CLI's spelling of its arguments."""
    message = re.sub(r"\bdownload=True\b", "--data.init_args.download true", message)
    return re.sub(r"\bpoint data_dir\b", "point --data.init_args.data_dir (or $RNNDROP_DATA_DIR)",
                  message)  # fmt: skip
