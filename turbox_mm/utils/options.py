"""Declarative, validated option tables (the ``turbox`` section of a config)."""
import difflib
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple, Union


@dataclass(frozen=True)
class Option:
    """One option of a table.

    Args:
        default: The value used when the config does not set the option.
        types (tuple[type]): Accepted Python types. ``bool`` is not accepted where only
            ``int`` is named, although it is a subclass of ``int``.
        doc (str): What the option does, shown by :func:`describe_options`.
        choices (tuple, optional): The only values allowed. Defaults to None (any value of
            the accepted types).
    """

    default: Any
    types: Tuple[type, ...]
    doc: str
    choices: Optional[Tuple[Any, ...]] = None


Schema = Dict[str, Union[Option, 'Schema']]


def _type_ok(value: Any, types: Tuple[type, ...]) -> bool:
    if isinstance(value, bool) and bool not in types:
        return False
    return isinstance(value, types)


def check_options(given: Optional[Mapping], schema: Schema, path: str = 'turbox') -> dict:
    """Validate a config section against ``schema`` and fill in the defaults.

    Args:
        given (Mapping | None): The section as written in the config; None means empty.
        schema (dict): Option name to :class:`Option`, or to a nested schema for a sub-section.
        path (str): Dotted name of the section, used in error messages.
            Defaults to ``'turbox'``.

    Returns:
        dict: Every option of ``schema``, with the given value or the default.

    Raises:
        KeyError: A key is not in the schema. The message names it and lists the valid keys.
        TypeError: A value has the wrong type; the message names the key and the types.
        ValueError: A value is not one of the option's choices; the message lists them.

    Examples:
        >>> schema = {'report': Option(True, (bool,), 'log the options')}
        >>> check_options({}, schema)
        {'report': True}
        >>> try:
        ...     check_options({'reprot': False}, schema)
        ... except KeyError as error:
        ...     print(error.args[0])
        Unknown config key 'turbox.reprot'; did you mean 'report'? Valid keys of 'turbox': report.
    """
    if given is None:
        given = {}
    if not isinstance(given, Mapping):
        raise TypeError(f"Config key '{path}' must be a dict, got {type(given).__name__}: "
                        f'{given!r}')
    unknown = [key for key in given if key not in schema]
    if unknown:
        key = unknown[0]
        msg = f"Unknown config key '{path}.{key}'"
        close = difflib.get_close_matches(str(key), list(schema), n=3)
        if close:
            msg += f"; did you mean {', '.join(repr(c) for c in close)}?"
        else:
            msg += '.'
        raise KeyError(f"{msg} Valid keys of '{path}': {', '.join(sorted(schema))}.")
    result = {}
    for key, spec in schema.items():
        full = f'{path}.{key}'
        if isinstance(spec, dict):
            result[key] = check_options(given.get(key), spec, full)
            continue
        value = given.get(key, spec.default)
        if not _type_ok(value, spec.types):
            names = ' or '.join('None' if t is type(None) else t.__name__ for t in spec.types)
            raise TypeError(f"Config key '{full}' must be {names}, got "
                            f'{type(value).__name__}: {value!r}')
        if spec.choices is not None and value not in spec.choices:
            raise ValueError(f"Config key '{full}' is {value!r}; valid values: "
                             f"{', '.join(repr(c) for c in spec.choices)}.")
        result[key] = value
    return result


def describe_options(schema: Schema, path: str = 'turbox') -> str:
    """Render ``schema`` as an indented list of ``key = default: doc`` lines.

    Args:
        schema (dict): The option table.
        path (str): Dotted name of the section. Defaults to ``'turbox'``.

    Returns:
        str: One line per option.
    """
    lines = []
    for key, spec in schema.items():
        if isinstance(spec, dict):
            lines.append(describe_options(spec, f'{path}.{key}'))
        else:
            lines.append(f'{path}.{key} = {spec.default!r}: {spec.doc}')
    return '\n'.join(lines)
