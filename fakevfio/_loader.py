"""Loading driver plugins from the ``fakevfio.drivers`` entry-point group.

Every driver, the built-in ``ram`` too, is found the same way. A bad plugin
(import error, not a driver class, duplicate name) becomes a
:class:`~fakevfio.errors.DriverLoadError` that names the entry point; it is
reported, and the other drivers still load.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
from collections.abc import Iterable, Mapping

import attrs

from fakevfio.driver import ArcDriver
from fakevfio.errors import DriverLoadError

logger = logging.getLogger(__name__)
GROUP = "fakevfio.drivers"


@attrs.frozen
class DriverSet:
    """The drivers that loaded, and the errors of those that did not."""

    drivers: Mapping[str, type[ArcDriver]]
    errors: tuple[DriverLoadError, ...] = ()


def _validate(name: str, value: str, obj: object) -> type[ArcDriver]:
    if not isinstance(obj, type) or not issubclass(obj, ArcDriver):
        raise DriverLoadError(
            name, value, f"{obj!r} is not a subclass of fakevfio.driver.ArcDriver (or StateDriver)"
        )
    abstract = sorted(getattr(obj, "__abstractmethods__", ()))
    if abstract:
        raise DriverLoadError(name, value, f"{obj.__name__} leaves abstract: {', '.join(abstract)}")
    return obj


def load_drivers(
    entry_points: Iterable[importlib.metadata.EntryPoint] | None = None,
    *,
    extra_modules: Iterable[str] = (),
) -> DriverSet:
    """Load every driver of the group (or of ``entry_points``, for tests).

    ``extra_modules`` are explicit ``NAME=module:Class`` specs (``--driver``).
    """
    if entry_points is None:
        entry_points = importlib.metadata.entry_points(group=GROUP)
    drivers: dict[str, type[ArcDriver]] = {}
    sources: dict[str, str] = {}
    errors: list[DriverLoadError] = []
    candidates: list[tuple[str, str, object]] = []
    for ep in entry_points:
        try:
            candidates.append((ep.name, ep.value, ep.load()))
        except Exception as exc:  # noqa: BLE001 - any import failure is the plugin's error
            errors.append(
                DriverLoadError(ep.name, ep.value, f"import failed: {type(exc).__name__}: {exc}")
            )
    for spec in extra_modules:
        name, _, value = spec.partition("=")
        try:
            module, _, attr = value.partition(":")
            if not name or not module or not attr:
                raise ValueError("expected NAME=module:Class")
            candidates.append((name, value, getattr(importlib.import_module(module), attr)))
        except Exception as exc:  # noqa: BLE001
            errors.append(
                DriverLoadError(name, value, f"import failed: {type(exc).__name__}: {exc}")
            )
    for name, value, obj in candidates:
        try:
            cls = _validate(name, value, obj)
            if name in drivers:
                raise DriverLoadError(
                    name, value, f"duplicate driver name (already provided by {sources[name]})"
                )
        except DriverLoadError as exc:
            errors.append(exc)
            continue
        drivers[name] = cls
        sources[name] = value
    for err in errors:
        logger.error("%s", err)
    return DriverSet(drivers, tuple(errors))
