"""Options declared once: a dataclass field carries its command-line flag, help and parser.

    @dataclass
    class TrainConfig:
        lr: float = option(2e-4, "peak learning rate", type=positive_float)

`add_options(parser, TrainConfig)` adds `--lr` (with the dataclass default shown in the
help), and `from_options(TrainConfig, args)` builds the config back, so a setting exists
in one place for the Python API, the saved run record and the command line.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
from typing import Any, Callable, Optional, Sequence, Tuple, Type


def _int_at_least(low: int, what: str) -> Callable[[str], int]:
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            v = None
        if v is None or v < low:
            raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}")
        return v
    return parse


positive_int = _int_at_least(1, "a positive integer")
nonneg_int = _int_at_least(0, "an integer >= 0")


def nonneg_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
    if not math.isfinite(v) or v < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {s!r}")
    return v


def positive_float(s: str) -> float:
    v = nonneg_float(s)
    if v == 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {s!r}")
    return v


def step_list(s: str) -> Tuple[int, ...]:
    try:
        steps = tuple(int(v) for v in s.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated step numbers (e.g. 15000,18000), got {s!r}") \
            from None
    if any(v < 1 for v in steps) or list(steps) != sorted(set(steps)):
        raise argparse.ArgumentTypeError(f"expected increasing positive step numbers, got {s!r}")
    return steps


def option(default: Any = dataclasses.MISSING, help: str = "", *, flag: Optional[str] = None,
           type: Optional[Callable[[str], Any]] = None, choices: Optional[Sequence[str]] = None,
           required: bool = False, metavar: Optional[str] = None, cli: bool = True,
           default_factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with its command-line form. Booleans become switches: `--name` for a
    False default, `flag` (e.g. "--no-progress") for a True default. cli=False keeps a field
    out of the command line (Python API and records only)."""
    metadata = dict(help=help, flag=flag, type=type, choices=choices, required=required, metavar=metavar, cli=cli)
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return f.default


def add_options(parser: argparse.ArgumentParser, cls: Type, exclude: Sequence[str] = (), **defaults: Any) -> None:
    """Add a flag for every command-line field of dataclass `cls` (not in `exclude`);
    `defaults` replaces a field's default on this parser only (e.g. another command's)."""
    for f in dataclasses.fields(cls):
        md = f.metadata
        if not md.get("cli") or f.name in exclude:
            continue
        default = defaults.get(f.name, _default(f))
        flag = md["flag"] or "--" + f.name.replace("_", "-")
        if isinstance(default, bool) and md["type"] is None:
            action = "store_false" if default else "store_true"
            parser.add_argument(flag, dest=f.name, action=action, default=default, help=md["help"])
            continue
        shown = "" if md["required"] or default is None or default == () else f" (default: {default})"
        kwargs = dict(dest=f.name, default=default, help=(md["help"] + shown).replace("%", "%%"),
                      required=md["required"])
        if md["choices"] is not None:
            kwargs["choices"] = list(md["choices"])
        if md["type"] is not None:
            kwargs["type"] = md["type"]
        elif default is not None and not isinstance(default, (tuple, list, dict)):
            kwargs["type"] = type(default)
        if md["metavar"]:
            kwargs["metavar"] = md["metavar"]
        parser.add_argument(flag, **kwargs)


def from_options(cls: Type, args: argparse.Namespace, **extra: Any) -> Any:
    """An instance of `cls` from parsed arguments (fields the parser does not have keep their
    dataclass defaults), with `extra` fields set explicitly."""
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in vars(args).items() if k in names}
    values.update(extra)
    return cls(**values)
