"""Command-line options and config files from one dataclass per command.

Each command declares its options once, as a dataclass whose fields carry defaults and a
``help`` metadata string. :func:`parse` builds an ``argparse`` parser from it (``--field-name``
per field, booleans as ``--flag/--no-flag``), reads ``--config FILE`` (YAML or JSON, through
PyYAML) and applies, lowest to highest precedence: field defaults, the config file, the
command line. A config key that is not a field is a one-line error naming the key and its
close matches.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import types
import typing
from pathlib import Path

from fastweights.errors import FastWeightsError

__all__ = ["load_config_file", "option", "parse"]


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` with each default, unless the help text names its own or there is none."""

    def _get_help_string(self, action):
        if "(default" in (action.help or "") or action.default in ("", None, []):
            return action.help
        return super()._get_help_string(action)


def option(help: str, default=None, factory=None):
    """A dataclass field for :func:`parse`: its default (or ``factory``) and its ``--help`` text."""
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


def _base_type(tp):
    """(element type, is_list, optional) of a field annotation like ``int | None`` or ``list[int]``."""
    optional = False
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        tp = args[0]
    if typing.get_origin(tp) in (list, tuple):
        return typing.get_args(tp)[0], True, optional
    return tp, False, optional


def load_config_file(path: str) -> dict:
    """A YAML or JSON mapping from ``path``."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise FastWeightsError(f"config file not found: {path}")
    class _NoDuplicates(yaml.SafeLoader):  # YAML and JSON keep the last of two equal keys silently
        def construct_mapping(self, node, deep=False):
            for key_node, value_node in node.value:  # a merged mapping's own keys are checked too
                if key_node.tag == "tag:yaml.org,2002:merge":
                    subs = value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
                    for sub in subs:
                        if isinstance(sub, yaml.MappingNode):
                            self._unique_keys(sub, deep)
            self._unique_keys(node, deep)
            return super().construct_mapping(node, deep=deep)

        def _unique_keys(self, node, deep):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # "<<: *defaults": its keys may be overridden
                    continue
                key = self.construct_object(key_node, deep=True)
                if not isinstance(key, str | int | float | bool | type(None)):
                    raise FastWeightsError(f"{path}: config keys must be option names, got {key!r}")
                if key in seen:
                    raise FastWeightsError(f"{path}: option {key!r} is given twice")
                seen.add(key)

    try:
        data = yaml.load(p.read_text(), Loader=_NoDuplicates)  # noqa: S506  (a SafeLoader)
    except yaml.YAMLError as err:
        raise FastWeightsError(f"{path}: not valid YAML/JSON ({str(err).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise FastWeightsError(f"{path}: a config must be a mapping of option names to values")
    return data


def _coerce(name: str, value, field_type, source: str):
    elem, is_list, optional = _base_type(field_type)
    if value is None and optional:
        return None
    kind = getattr(elem, "__name__", elem)
    try:
        if is_list:
            if isinstance(value, str):
                value = [v for v in value.split(",") if v.strip()]
            elif not isinstance(value, (list, tuple)):
                value = [value]  # one value for a list option
            return [_strict(elem, v) for v in value]
        return _strict(elem, value)
    except (TypeError, ValueError):
        what = f"a list of {kind}" if is_list else kind
        raise FastWeightsError(f"{source}: option {name!r} must be {what}, got {value!r}") from None


def _strict(elem, v):
    """``elem(v)`` without the conversions that lose or invent information: a bool only from a
    bool, an int not from a bool or a fractional float, no number from a bool, no container."""
    if isinstance(v, (list, tuple, dict)):
        raise TypeError
    if elem is bool:
        if not isinstance(v, bool):
            raise TypeError
        return v
    if elem in (int, float, str) and isinstance(v, bool):  # YAML reads yes/no/on/off as bools
        raise TypeError
    if elem is int and isinstance(v, float):
        if not v.is_integer():
            raise ValueError
        return int(v)
    return elem(v)


def parse(cls, argv: list[str], prog: str, description: str):
    """Parse ``argv`` into an instance of dataclass ``cls`` (see the module docstring)."""
    hints = typing.get_type_hints(cls)
    fields = [f for f in dataclasses.fields(cls) if f.init]
    # allow_abbrev=False: "--conf FILE" was read as --config by argparse but not by the scan
    # below, so the file was silently ignored; prefixes of the other flags are refused alike
    parser = argparse.ArgumentParser(prog=prog, description=description, formatter_class=_HelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--config", metavar="FILE", help="YAML or JSON file of options; the command line overrides it")
    for f in fields:
        elem, is_list, _ = _base_type(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kwargs = {"dest": f.name, "help": f.metadata.get("help", ""), "default": default}
        if elem is bool and not is_list:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        elif is_list:
            parser.add_argument(flag, type=elem, nargs="+", metavar=elem.__name__.upper(), **kwargs)
        else:
            parser.add_argument(flag, type=elem, metavar=elem.__name__.upper(), **kwargs)
    config_path = None
    for i, a in enumerate(argv):
        if a == "--config" and i + 1 < len(argv):
            config_path = argv[i + 1]
        elif a.startswith("--config="):
            config_path = a.split("=", 1)[1]
    if config_path is not None and not any(a in ("-h", "--help") for a in argv):
        names = {f.name for f in fields}
        overrides, given = {}, {}
        for key, value in load_config_file(config_path).items():
            norm = str(key).replace("-", "_")
            if norm not in names:
                close = difflib.get_close_matches(norm, sorted(names), n=3)
                hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
                raise FastWeightsError(f"{config_path}: unknown config key {key!r}{hint}")
            if norm in given:
                raise FastWeightsError(f"{config_path}: option {norm!r} is given twice ({given[norm]!r} and {key!r})")
            given[norm] = key
            if value is None and not _base_type(hints[norm])[2]:
                continue  # an empty YAML value ("out:"): the option's default, not the string "None"
            overrides[norm] = _coerce(norm, value, hints[norm], config_path)
        parser.set_defaults(**overrides)
    ns = parser.parse_args(argv)
    values = {f.name: getattr(ns, f.name) for f in fields}
    return cls(**values)
