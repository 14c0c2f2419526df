"""``record``: this package's value classes, as ``dataclasses.dataclass`` declares them, made in microseconds.

Why not ``dataclasses``: it writes each class's ``__init__``, ``__eq__``, ``__hash__``, ``__repr__``,
``__setattr__`` and ``__delattr__`` as source text and compiles it at import, about 0.4 ms a class, and
importing it loads ``inspect``. Together that was 25 ms of an apply whose whole budget, an init container on
every pod's start-up path, is about 40 ms. Here those methods are written once and read a class's field table,
so making a class costs a few microseconds, and an instance a microsecond or so more than a dataclass's.

Type checkers see the standard semantics (PEP 681): ``@record`` is a frozen dataclass, ``@mutable_record`` a
mutable one; ``field`` takes ``default``, ``default_factory`` and ``compare``.
"""

from __future__ import annotations

TYPE_CHECKING = False  # mypy takes any TYPE_CHECKING as true; importing typing would cost 2 ms at run time
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, TypeVar

    from typing_extensions import dataclass_transform

    T = TypeVar("T")
    R = TypeVar("R", bound=type)
else:

    def dataclass_transform(**_: object) -> object:
        return lambda function: function


_NO_DEFAULT: Any = object()


class FrozenInstanceError(AttributeError):
    """An attribute of a frozen record was set or deleted."""


class _Field:
    __slots__ = ("compare", "default", "factory")

    def __init__(self, default: object, factory: Callable[[], object] | None, compare: bool) -> None:
        self.default, self.factory, self.compare = default, factory, compare


def field(*, default: T = _NO_DEFAULT, default_factory: Callable[[], T] | None = None, compare: bool = True) -> Any:
    """A field with a default made per instance (``default_factory``), or left out of ``==`` and the hash."""
    return _Field(default, default_factory, compare)


class _Table:
    """A record class's fields: names in order, defaults, factories, and the names ``==`` and hash compare."""

    __slots__ = ("compared", "defaults", "factories", "names")
    names: tuple[str, ...]
    defaults: dict[str, object]
    factories: dict[str, Callable[[], object]]
    compared: tuple[str, ...]

    def __init__(self, cls: type, inherited: _Table | None) -> None:
        self.names = inherited.names if inherited else ()
        self.defaults = dict(inherited.defaults) if inherited else {}
        self.factories = dict(inherited.factories) if inherited else {}
        compared = list(inherited.compared) if inherited else []
        for name in cls.__annotations__:  # its own only (Python 3.10 and later)
            declared = cls.__dict__.get(name, _NO_DEFAULT)
            spec = declared if isinstance(declared, _Field) else _Field(declared, None, True)
            if isinstance(declared, _Field):
                delattr(cls, name)
            if spec.factory is not None:
                self.factories[name] = spec.factory
            elif spec.default is not _NO_DEFAULT:
                self.defaults[name] = spec.default
            elif self.defaults or self.factories:
                raise TypeError(f"{cls.__name__}: field {name} without a default follows one with a default")
            if name not in self.names:
                self.names += (name,)
            if spec.compare:
                compared.append(name)
        self.compared = tuple(compared)


@dataclass_transform(frozen_default=True, field_specifiers=(field,))
def record(cls: R) -> R:
    """Give ``cls`` an ``__init__`` taking its annotated fields (positional or by name), ``==``, a ``repr``,
    a hash, and immutability. ``__post_init__`` runs after ``__init__`` when defined."""
    _make(cls, frozen=True)
    return cls


@dataclass_transform(field_specifiers=(field,))
def mutable_record(cls: R) -> R:
    """``record`` without the hash and the immutability."""
    _make(cls, frozen=False)
    return cls


def _make(cls: Any, frozen: bool) -> None:
    cls.__record__ = _Table(cls, getattr(cls, "__record__", None))
    cls.__init__ = _init
    cls.__eq__ = _eq
    cls.__repr__ = _repr
    # As dataclasses: a mutable record that compares by value has no hash.
    cls.__hash__ = _hash if frozen else None
    if frozen:
        cls.__setattr__ = cls.__delattr__ = _refuse


def _init(self: Any, *args: object, **kwargs: object) -> None:
    table: _Table = self.__record__
    names = table.names
    if len(args) > len(names):
        raise TypeError(f"{type(self).__name__}() takes {len(names)} arguments, {len(args)} given")
    values = dict(zip(names, args, strict=False))
    for name, value in kwargs.items():
        if name not in names or name in values:
            raise TypeError(f"{type(self).__name__}() got an unexpected or repeated argument {name!r}")
        values[name] = value
    if len(values) < len(names):
        for name in names:
            if name in values:
                continue
            if name in table.defaults:
                values[name] = table.defaults[name]
            elif name in table.factories:
                values[name] = table.factories[name]()
            else:
                raise TypeError(f"{type(self).__name__}() missing argument {name!r}")
    # Straight into the instance dict: a frozen record's __setattr__ refuses.
    self.__dict__.update(values)
    post_init = getattr(self, "__post_init__", None)
    if post_init is not None:
        post_init()


def _key(self: Any) -> tuple[object, ...]:
    attributes = self.__dict__
    return tuple(attributes[name] for name in self.__record__.compared)


def _eq(self: Any, other: object) -> object:
    if type(other) is not type(self):
        return NotImplemented
    return self is other or _key(self) == _key(other)


def _hash(self: Any) -> int:
    return hash(_key(self))


def _repr(self: Any) -> str:
    attributes = self.__dict__
    shown = ", ".join(f"{name}={attributes[name]!r}" for name in self.__record__.names)
    return f"{type(self).__qualname__}({shown})"


def _refuse(self: Any, name: str, *value: object) -> None:
    raise FrozenInstanceError(f"cannot assign to field {name!r} of a frozen {type(self).__name__}")


def replace(value: T, /, **changes: object) -> T:
    """A copy of the record ``value`` with ``changes`` (``dataclasses.replace``)."""
    current = value.__dict__
    names: tuple[str, ...] = value.__record__.names  # type: ignore[attr-defined]
    return type(value)(**{name: current[name] for name in names} | changes)


def field_names(value: object) -> tuple[str, ...]:
    """The fields of the record ``value``, in declaration order."""
    names: tuple[str, ...] = value.__record__.names  # type: ignore[attr-defined]
    return names
