"""Loading driver plugins from entry points (group fakevfio.drivers)."""

from __future__ import annotations

import sys
import types
from collections.abc import Mapping
from importlib.metadata import EntryPoint

import pytest

from fakevfio._loader import GROUP, load_drivers
from fakevfio._ram import RamDriver
from fakevfio.driver import ArcDriver, LoadStream, SaveStream, StateDriver
from fakevfio.errors import DriverLoadError
from vfio_uapi.fsm import MigFlags, State

MODULE = "fakevfio_test_plugins"


class GoodDriver(ArcDriver):
    @property
    def migration_flags(self) -> MigFlags:
        return MigFlags.STOP_COPY

    def step(
        self, current: State, nxt: State, stream: SaveStream | LoadStream | None
    ) -> SaveStream | LoadStream | None:
        return None

    def data_size(self, stream: SaveStream | LoadStream | None) -> int:
        return 0

    def digest(self) -> str:
        return ""


class HalfDriver(StateDriver):
    """Forgets save_range/load_range."""

    @property
    def migration_flags(self) -> MigFlags:
        return MigFlags.STOP_COPY

    def state_size(self) -> int:
        return 1


def not_a_class() -> None:
    """A function, not a driver."""


class NotADriver:
    options: Mapping[str, str] = {}


@pytest.fixture
def plugins(monkeypatch: pytest.MonkeyPatch) -> str:
    module = types.ModuleType(MODULE)
    module.GoodDriver = GoodDriver  # type: ignore[attr-defined]
    module.HalfDriver = HalfDriver  # type: ignore[attr-defined]
    module.not_a_class = not_a_class  # type: ignore[attr-defined]
    module.NotADriver = NotADriver  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, MODULE, module)
    return MODULE


def ep(name: str, value: str) -> EntryPoint:
    return EntryPoint(name=name, value=value, group=GROUP)


def test_load_drivers_good_plugin(plugins: str) -> None:
    result = load_drivers([ep("good", f"{plugins}:GoodDriver")])
    assert result.drivers == {"good": GoodDriver}
    assert result.errors == ()


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("fakevfio_no_such_module_xyz:Driver", "import failed: ModuleNotFoundError"),
        (f"{MODULE}:Missing", "import failed: AttributeError"),
        (f"{MODULE}:not_a_class", "is not a subclass of fakevfio.driver.ArcDriver"),
        (f"{MODULE}:NotADriver", "is not a subclass of fakevfio.driver.ArcDriver"),
        (f"{MODULE}:HalfDriver", "HalfDriver leaves abstract: load_range, save_range"),
        ("fakevfio.driver:StateDriver", "StateDriver leaves abstract"),
    ],
)
def test_load_drivers_bad_plugin_gives_one_error_and_others_load(
    plugins: str, value: str, reason: str
) -> None:
    eps = [
        ep("first", f"{plugins}:GoodDriver"),
        ep("bad", value),
        ep("ram", "fakevfio._ram:RamDriver"),
    ]
    result = load_drivers(eps)
    assert result.drivers == {"first": GoodDriver, "ram": RamDriver}
    assert len(result.errors) == 1
    err = result.errors[0]
    assert isinstance(err, DriverLoadError)
    assert (err.name, err.value) == ("bad", value)
    assert reason in err.reason
    assert "'bad'" in str(err)
    assert value in str(err)
    assert GROUP in str(err)


def test_load_drivers_duplicate_name(plugins: str) -> None:
    eps = [
        ep("ram", "fakevfio._ram:RamDriver"),
        ep("ram", f"{plugins}:GoodDriver"),
        ep("good", f"{plugins}:GoodDriver"),
    ]
    result = load_drivers(eps)
    assert result.drivers == {"ram": RamDriver, "good": GoodDriver}
    assert len(result.errors) == 1
    err = result.errors[0]
    assert (err.name, err.value) == ("ram", f"{plugins}:GoodDriver")
    assert "duplicate driver name (already provided by fakevfio._ram:RamDriver)" in err.reason


def test_load_drivers_all_bad_kinds_together(plugins: str) -> None:
    eps = [
        ep("good", f"{plugins}:GoodDriver"),
        ep("imp", "fakevfio_no_such_module_xyz:D"),
        ep("func", f"{plugins}:not_a_class"),
        ep("plain", f"{plugins}:NotADriver"),
        ep("half", f"{plugins}:HalfDriver"),
        ep("good", f"{plugins}:GoodDriver"),
    ]
    result = load_drivers(eps)
    assert result.drivers == {"good": GoodDriver}
    assert [e.name for e in result.errors] == ["imp", "func", "plain", "half", "good"]


def test_load_drivers_import_raising_anything(monkeypatch: pytest.MonkeyPatch) -> None:
    class Exploding(EntryPoint):
        def load(self) -> object:
            raise RuntimeError("plugin crashed at import")

    result = load_drivers([Exploding(name="crash", value="x:y", group=GROUP)])
    assert result.drivers == {}
    assert "import failed: RuntimeError: plugin crashed at import" in result.errors[0].reason


def test_load_drivers_extra_modules(plugins: str) -> None:
    result = load_drivers(
        [], extra_modules=[f"mine={plugins}:GoodDriver", "broken", f"x={plugins}:Nope"]
    )
    assert result.drivers == {"mine": GoodDriver}
    assert [e.name for e in result.errors] == ["broken", "x"]


def test_load_drivers_builtin_ram_from_installed_entry_points() -> None:
    result = load_drivers()
    assert result.drivers["ram"] is RamDriver
    assert not [e for e in result.errors if e.name == "ram"]


def test_load_drivers_uses_importlib_metadata_group(
    monkeypatch: pytest.MonkeyPatch, plugins: str
) -> None:
    seen: list[str] = []

    def fake_entry_points(*, group: str) -> list[EntryPoint]:
        seen.append(group)
        return [ep("good", f"{plugins}:GoodDriver")]

    monkeypatch.setattr("importlib.metadata.entry_points", fake_entry_points)
    assert load_drivers().drivers == {"good": GoodDriver}
    assert seen == ["fakevfio.drivers"]
