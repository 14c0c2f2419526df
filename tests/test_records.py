"""``record`` behaves as ``dataclasses.dataclass`` does for everything this package uses: the same classes
declared both ways are compared on random values, and the edges are checked one by one."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from istio_iptables.records import FrozenInstanceError, field, field_names, mutable_record, record, replace


@record
class Point:
    x: int
    y: int = 0
    tags: tuple[str, ...] = field(default=())
    note: str = field(default="", compare=False)


@dataclasses.dataclass(frozen=True)
class PointDC:
    x: int
    y: int = 0
    tags: tuple[str, ...] = dataclasses.field(default=())
    note: str = dataclasses.field(default="", compare=False)


@mutable_record
class Bag:
    name: str
    items: list[int] = field(default_factory=list)


VALUES = st.tuples(st.integers(), st.integers(), st.lists(st.text(max_size=3), max_size=3).map(tuple), st.text())


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(VALUES, VALUES)
def test_a_record_compares_hashes_and_prints_as_the_same_dataclass(a: tuple, b: tuple) -> None:  # type: ignore[type-arg]
    ours, theirs = (Point(*a), Point(*b)), (PointDC(*a), PointDC(*b))
    assert (ours[0] == ours[1]) == (theirs[0] == theirs[1])
    assert (hash(ours[0]) == hash(ours[1])) == (hash(theirs[0]) == hash(theirs[1])) or ours[0] != ours[1]
    assert repr(ours[0]).replace("Point(", "PointDC(", 1) == repr(theirs[0])
    assert replace(ours[0], y=a[0]) == Point(a[0], a[0], a[2], a[3])
    assert field_names(ours[0]) == tuple(f.name for f in dataclasses.fields(theirs[0]))


def test_arguments_by_position_by_name_and_defaults() -> None:
    assert Point(1) == Point(x=1) == Point(1, 0, ()) == Point(1, tags=(), y=0)
    assert Point(1, note="a") == Point(1, note="b")  # compare=False
    assert Point(1) != PointDC(1)  # different classes never compare equal
    for bad in (Point, lambda: Point(1, 2, (), "", 5), lambda: Point(1, x=1), lambda: Point(1, z=1)):
        with pytest.raises(TypeError):
            bad()


def test_a_record_is_frozen_and_a_mutable_record_is_not_hashable() -> None:
    point = Point(1)
    with pytest.raises(FrozenInstanceError):
        point.x = 2  # type: ignore[misc]
    with pytest.raises(FrozenInstanceError):
        del point.x  # type: ignore[misc]
    bag, other = Bag("a"), Bag("a")
    bag.items.append(1)
    assert other.items == []  # a factory makes one per instance
    bag.name = "b"
    assert bag == Bag("b", [1])
    with pytest.raises(TypeError):
        hash(bag)


def test_subclasses_inherit_fields_and_post_init_runs() -> None:
    seen: list[int] = []

    @record
    class Checked(Point):
        def __post_init__(self) -> None:
            seen.append(self.x)

    assert Checked(3, 4) == Checked(x=3, y=4) and seen == [3, 3]
    assert field_names(Checked(1)) == ("x", "y", "tags", "note")


def test_a_field_without_default_cannot_follow_one_with_a_default() -> None:
    with pytest.raises(TypeError):

        @record
        class Broken:
            a: int = 0
            b: int
