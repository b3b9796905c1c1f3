"""One registry class for every family of named things: merge methods, routers, training methods.

A family is a :class:`Registry`. Its entries register themselves by name (a decorator in their own file) and the
registry imports the modules where they live the first time it is asked, discovering a package's modules with
pkgutil: a new entry is a new file, listed nowhere else. An entry declares its hyperparameters as :class:`Param` s;
the Python API checks values with :meth:`Param.check` and the command line builds its options from them.
"""

from __future__ import annotations

import importlib
import math
import pkgutil
from dataclasses import dataclass
from typing import Any, Generic, Iterator, TypeVar

from .errors import PeftmergeError, did_you_mean

T = TypeVar("T")


@dataclass(frozen=True)
class Param:
    """A hyperparameter: its default, its valid values and what it means.

    ``choices``: the valid values (strings); otherwise a finite number in [``low``, ``high``] (``low`` excluded
    where ``low_open``), a whole number where the default is an int. ``per_model``: may be given per input (a
    list, one value per input) in the Python API and recipes. ``neutral``: the value at which the parameter leaves
    a single input unchanged (density 1 keeps every entry, gamma 0 drops no outlier), where there is one.
    ``grid``: the values a grid search tries by default (a parameter without one is not searched).
    """

    name: str
    default: Any
    help: str
    choices: tuple | None = None
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    per_model: bool = False
    neutral: Any = None
    grid: tuple | None = None

    @property
    def whole(self) -> bool:
        return isinstance(self.default, int) and not isinstance(self.default, bool)

    def check(self, value: Any, n: int = 1) -> Any:
        """``value`` checked (a list of ``n`` values where ``per_model``); a one-line error names the value and the
        valid range otherwise."""
        if isinstance(value, (list, tuple)):
            if not self.per_model:
                raise PeftmergeError(f"{self.name} takes one value, got a list {list(value)}")
            if len(value) != n:
                raise PeftmergeError(f"{self.name} has {len(value)} values for {n} inputs; give one per input")
            return [self._one(v) for v in value]
        return self._one(value)

    def _one(self, v: Any) -> Any:
        if self.choices is not None:
            if v not in self.choices:
                raise PeftmergeError(f"{self.name} {v!r} is not one of {', '.join(map(str, self.choices))}")
            return v
        try:
            if isinstance(v, bool):
                raise TypeError
            fv = float(v)
        except (TypeError, ValueError, OverflowError):
            raise PeftmergeError(f"{self.name} {v!r} is not a number; give {'a whole' if self.whole else 'a'} "
                                 "number") from None
        if not math.isfinite(fv):
            raise PeftmergeError(f"{self.name} {v} is not a finite number; give a finite value")
        if self.whole and fv != int(fv):
            raise PeftmergeError(f"{self.name} {v} must be a whole number")
        if self.low is not None and (fv <= self.low if self.low_open else fv < self.low):
            raise PeftmergeError(f"{self.name} {v} is out of range: {self.range()}")
        if self.high is not None and fv > self.high:
            raise PeftmergeError(f"{self.name} {v} is out of range: {self.range()}")
        return int(fv) if self.whole else (v if isinstance(v, (int, float)) else fv)

    def range(self) -> str:
        """The valid values, in words."""
        if self.choices is not None:
            return f"one of {', '.join(map(str, self.choices))}"
        if self.low is not None and self.high is not None:
            return f"must be in {'(' if self.low_open else '['}{self.low}, {self.high}]"
        if self.low is not None:
            return f"must be {'>' if self.low_open else '>='} {self.low}"
        if self.high is not None:
            return f"must be <= {self.high}"
        return "any finite number"


def resolve(params: tuple[Param, ...], given: dict, n: int, owner: str, always: tuple[Param, ...] = ()) -> dict:
    """``given`` values checked and the defaults filled in; an unknown parameter is an error naming ``owner`` and its
    parameters. ``always``: parameters every entry of the family accepts (kept only where given)."""
    known = {p.name: p for p in params}
    extra = {p.name: p for p in always if p.name not in known}
    for key, value in given.items():
        if value is not None and key not in known and key not in extra:
            raise PeftmergeError(f"{owner} takes no parameter {key!r} (its parameters: {', '.join(known) or 'none'})")
    out = {p.name: p.check(given[p.name], n) if given.get(p.name) is not None else p.default for p in params}
    out.update({name: p.check(given[name], n) for name, p in extra.items() if given.get(name) is not None})
    return out


class Registry(Generic[T]):
    """Named entries of one family (``kind``: "merge method", "router", "method"), with aliases.

    ``where``: the modules that define the entries, imported on first use: a package (every module in it is
    imported, found by pkgutil) or a tuple of module names. ``ordered``: :meth:`names` in registration order
    instead of sorted."""

    def __init__(self, kind: str, where: str | tuple[str, ...], *, ordered: bool = False):
        self.kind, self.where, self.ordered = kind, where, ordered
        self._entries: dict[str, T] = {}
        self._aliases: dict[str, str] = {}
        self._loaded = False

    def add(self, name: str, entry: T, aliases: tuple[str, ...] = ()) -> T:
        """Register ``entry`` under ``name`` (and ``aliases``); a name registered twice is a bug."""
        for key in (name, *aliases):
            if key in self._entries or key in self._aliases:
                raise ValueError(f"{self.kind} {key!r} is registered twice")
        self._entries[name] = entry
        self._aliases.update({a: name for a in aliases})
        return entry

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        for module in ([self.where] if isinstance(self.where, str) else self.where):
            package = importlib.import_module(module)
            for info in pkgutil.iter_modules(getattr(package, "__path__", [])):
                importlib.import_module(f"{module}.{info.name}")

    def names(self) -> list[str]:
        """Every registered name (aliases not included)."""
        self._load()
        return list(self._entries) if self.ordered else sorted(self._entries)

    def aliases(self) -> dict[str, str]:
        self._load()
        return dict(self._aliases)

    def get(self, name: str) -> T:
        """The entry called ``name`` (or an alias of it); an unknown name lists the valid ones."""
        self._load()
        key = self._aliases.get(name, name)
        if key not in self._entries:
            raise PeftmergeError(f"unknown {self.kind} {name!r}; choose one of: {', '.join(self.names())}"
                                 f"{did_you_mean(name, [*self.names(), *self._aliases])}")
        return self._entries[key]

    def __iter__(self) -> Iterator[T]:
        return iter([self._entries[n] for n in self.names()])
