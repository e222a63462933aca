"""Config values: one value a user wrote, converted to the type its field declares, and the one error every config
mistake raises (ConfigError, naming the field, the value and what is allowed).

Apart from the sections so that everything that checks a value (the sections here and in the packages above,
the training batch arithmetic in deeplab.train_batch) imports the conversion and the error without the registry,
the experiment or the command line.
"""
from __future__ import annotations

from typing import Union, get_args, get_origin

from ..cli import UserError


class ConfigError(UserError, ValueError):
    """A config value a user wrote is not allowed; the message names the field and what is allowed.
    ``fields``: the SECTION.FIELD keys at fault, so the error can name the file or --set item they came from."""

    def __init__(self, message: str = "", fields: tuple = ()):
        super().__init__(message)
        self.fields = tuple(fields)




def show_value(value) -> str:
    """A value as a user wrote it: strings quoted (so 'fast' reads as text), lists in brackets, YAML words."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(show_value(v) for v in value) + "]"
    return repr(value) if isinstance(value, str) else str(value)


def fail_value(key: str, value, what: str):
    raise ConfigError(f"{key}={show_value(value)} {what}", (key,))


def describe_type(hint) -> str:
    """The type a field expects, in words for an error message."""
    args = get_args(hint)
    if get_origin(hint) is Union:
        return " or ".join("null" if a is type(None) else describe_type(a) for a in args)
    if get_origin(hint) is tuple:
        kind = "numbers" if args[0] is float else "integers"
        return f"a list of {kind}" if args[-1] is Ellipsis else f"a list of {len(args)} {kind}"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string",
            dict: "a mapping"}.get(hint, str(hint))


def convert_value(value, hint) -> tuple:
    """(True, value as ``hint``) or (False, None). Lossless only: 16.0 is not an integer, 'fast' not a number;
    YAML's 1e-4 (read as text) is a number, a number is a string where a string belongs."""
    if get_origin(hint) is Union:
        for option in get_args(hint):
            if option is type(None):
                if value is None:
                    return True, None
                continue
            ok, converted = convert_value(value, option)
            if ok:
                return True, converted
        return False, None
    if get_origin(hint) is tuple:
        args = get_args(hint)
        if not isinstance(value, (list, tuple)) or (args[-1] is not Ellipsis and len(value) != len(args)):
            return False, None
        items = [convert_value(v, args[0]) for v in value]
        return (True, tuple(v for _, v in items)) if all(ok for ok, _ in items) else (False, None)
    if hint is bool:
        return isinstance(value, bool), value
    if isinstance(value, bool) or value is None:
        return False, None
    if hint is int:
        return isinstance(value, int), value
    if hint is float:
        if isinstance(value, str):
            try:
                return True, float(value)
            except ValueError:
                return False, None
        return isinstance(value, (int, float)), value  # an int stays as written (lr: 1)
    if hint is str:
        return isinstance(value, (str, int, float)), str(value) if isinstance(value, (str, int, float)) else None
    if hint is dict:
        return isinstance(value, dict), value
    return True, value

