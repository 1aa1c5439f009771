"""Smoke tests of the example driver plugins under ``examples/``, and their own tests.

Each example is its own distribution (``examples/<name>/pyproject.toml``) with
its own tests in ``examples/<name>/tests/test_<name>.py``. pytest's testpaths
is ``tests``, so this module is where those tests join the main run: it puts
the example projects on ``sys.path`` (as an editable install would), imports
each example's test module and re-exports its ``test_*`` functions, which
pytest then collects here (``tests/test_examples.py::test_mtty_...``).

The tests written here check the plugin path itself: loading through
``fakevfio._loader.load_drivers`` with injected entry points, a real
``pip install`` into a fresh virtual environment, and a broken plugin that
must not take the others down.
"""

from __future__ import annotations

import contextlib
import errno
import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from fakevfio._loader import GROUP, load_drivers
from fakevfio._options import DeviceSpec
from fakevfio._registry import Registry
from fakevfio.testing import LocalDevice, round_trip

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
#: Example name -> entry point value (as each example's pyproject.toml declares it).
PLUGINS = {
    "mtty": "fakevfio_mtty:MttyDriver",
    "nic": "fakevfio_nic:NicDriver",
    "gpu": "fakevfio_gpu:GpuDriver",
    "edu": "fakevfio_edu:EduDriver",
}


def _import_example_tests(name: str) -> types.ModuleType:
    project = EXAMPLES / name
    if str(project) not in sys.path:
        sys.path.insert(0, str(project))
    module_name = f"test_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    path = project / "tests" / f"test_{name}.py"
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


for _name in PLUGINS:
    _module = _import_example_tests(_name)
    for _attr, _obj in vars(_module).items():
        if _attr.startswith("test_") and callable(_obj):
            assert _attr not in globals(), f"test name clash: {_attr}"
            globals()[_attr] = _obj


def _entry_point(name: str, value: str) -> importlib.metadata.EntryPoint:
    return importlib.metadata.EntryPoint(name=name, value=value, group=GROUP)


def _example_entry_points() -> list[importlib.metadata.EntryPoint]:
    return [_entry_point(name, value) for name, value in PLUGINS.items()]


# -- (a) loading through the plugin loader --------------------------------------
def test_examples_pyprojects_declare_the_entry_points() -> None:
    for name, value in PLUGINS.items():
        text = (EXAMPLES / name / "pyproject.toml").read_text()
        assert '[project.entry-points."fakevfio.drivers"]' in text
        assert f'{name} = "{value}"' in text
        assert (EXAMPLES / name / "README.md").is_file()


def test_examples_load_through_injected_entry_points() -> None:
    loaded = load_drivers(_example_entry_points())
    assert loaded.errors == ()
    assert set(loaded.drivers) == set(PLUGINS)
    for cls in loaded.drivers.values():
        assert cls.description
        assert cls.options  # declared, so `fakevfio drivers` lists them


@pytest.mark.parametrize(
    ("spec", "other"),
    [
        ("a=mtty:nr_ports=2", "b=mtty:nr_ports=2"),
        ("a=nic:ring_size=16,filters=8,pps=1000", "b=nic:ring_size=16,filters=8"),
        ("a=gpu:mem=64K,seed=3,dirty_rate=64K", "b=gpu:mem=64K"),
    ],
)
def test_examples_migrate_between_registry_devices(spec: str, other: str) -> None:
    registry = Registry(load_drivers(_example_entry_points()).drivers)
    src = LocalDevice.around(registry.create(DeviceSpec.from_cli(spec)))
    dst = LocalDevice.around(registry.create(DeviceSpec.from_cli(other)))
    src.advance(0.5)
    round_trip(src, dst, save_chunk=4099)
    assert dst.info()["state_digest"] == src.info()["state_digest"]


# -- (c) a broken plugin is reported, the others keep working --------------------
def test_examples_broken_plugin_reports_clear_error_and_others_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "fakevfio_broken_example.py").write_text(
        textwrap.dedent(
            """
            import fakevfio_no_such_dependency  # the plugin's missing dependency

            class BrokenDriver:
                pass
            """
        )
    )
    (plugins / "fakevfio_not_a_driver.py").write_text("class NotADriver:\n    pass\n")
    monkeypatch.syspath_prepend(str(plugins))
    entry_points = [
        _entry_point("broken", "fakevfio_broken_example:BrokenDriver"),
        *_example_entry_points(),
        _entry_point("notadriver", "fakevfio_not_a_driver:NotADriver"),
    ]
    loaded = load_drivers(entry_points)
    assert set(loaded.drivers) == set(PLUGINS)
    errors = {err.name: str(err) for err in loaded.errors}
    assert set(errors) == {"broken", "notadriver"}
    assert "'broken'" in errors["broken"]
    assert "fakevfio_broken_example:BrokenDriver" in errors["broken"]
    assert "ModuleNotFoundError" in errors["broken"]
    assert "fakevfio_no_such_dependency" in errors["broken"]
    assert "not a subclass of fakevfio.driver.ArcDriver" in errors["notadriver"]
    # The examples still work after their neighbour failed.
    registry = Registry(loaded.drivers)
    dev = registry.create(DeviceSpec.from_cli("m=mtty"))
    assert dev.info()["driver"] == "mtty"


# -- (b) pip install into a fresh virtual environment ---------------------------
def _can_build_without_isolation() -> bool:
    """Whether this interpreter's setuptools can build a wheel with no network.

    setuptools before 70.1 needs the separate ``wheel`` package for that.
    """
    if importlib.util.find_spec("wheel") is not None:
        return True
    try:
        version = importlib.metadata.version("setuptools")
    except importlib.metadata.PackageNotFoundError:
        return False
    major, minor = (int(part) for part in version.split(".")[:2])
    return (major, minor) >= (70, 1)


def _copy_project(src: Path, dst: Path, parts: list[str]) -> Path:
    """Copy a source tree so the build leaves no build/ or egg-info in the repository."""
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build", ".mypy_cache")
    dst.mkdir(parents=True)
    for part in parts:
        path = src / part
        if path.is_dir():
            shutil.copytree(path, dst / part, ignore=ignore)
        elif path.exists():
            shutil.copy2(path, dst / part)
    return dst


@pytest.mark.slow
def test_examples_pip_install_into_fresh_venv_registers_the_driver(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60
    )
    python = venv / "bin" / "python"
    # The project's third-party dependencies (attrs, trio, ...) come from this
    # interpreter's site-packages, appended after the new venv's own: a plain
    # path line, so this venv's editable install of fakevfio (a .pth hook
    # there) stays invisible, and fakevfio comes from the wheel installed below.
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout.strip()
    Path(purelib, "_project_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    main_src = _copy_project(
        ROOT,
        tmp_path / "src" / "fakevfio",
        ["pyproject.toml", "README.md", "fakevfio", "migrator", "vfio_uapi"],
    )
    mtty_src = _copy_project(
        EXAMPLES / "mtty",
        tmp_path / "src" / "mtty",
        ["pyproject.toml", "README.md", "fakevfio_mtty"],
    )
    wheels = tmp_path / "wheels"
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(wheels)]
    if _can_build_without_isolation():
        build.append("--no-build-isolation")
    # else: pip fetches setuptools/wheel into an isolated build env from the configured index.
    subprocess.run([*build, str(main_src), str(mtty_src)], check=True, timeout=300)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "--no-deps",
            "--no-index",
            "--quiet",
            *map(str, sorted(wheels.glob("*.whl"))),
        ],
        check=True,
        timeout=300,
    )

    where = subprocess.run(
        [
            str(python),
            "-c",
            "import importlib.metadata as m, fakevfio;"
            "print(m.distribution('fakevfio-mtty').locate_file(''));"
            "print(fakevfio.__file__)",
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    ).stdout.splitlines()
    assert all(line.startswith(str(venv)) for line in where), where

    listing = subprocess.run(
        [str(python), "-m", "fakevfio", "drivers"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert listing.returncode == 0, listing.stderr
    assert "mtty" in listing.stdout
    assert "nr_ports" in listing.stdout
    assert "ram" in listing.stdout
    assert "nic" not in listing.stdout.split()  # only what was installed


# -- through a real mount: bytes written to a UART survive a migration ----------
@pytest.mark.fuse
def test_examples_mtty_migrates_through_a_mount(
    fakevfio_mount: Callable[..., contextlib.AbstractContextManager[Any]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    path = os.pathsep.join([str(EXAMPLES / "mtty"), os.environ.get("PYTHONPATH", "")])
    monkeypatch.setenv("PYTHONPATH", path.rstrip(os.pathsep))
    devices = ["src=mtty:nr_ports=2", "dst=mtty:nr_ports=2"]
    with fakevfio_mount(devices, extra_args=["--driver", "mtty=fakevfio_mtty:MttyDriver"]) as m:
        bar1 = os.open(m.file("src", "regions/bar1"), os.O_RDWR)
        try:
            for byte in b"uart":
                assert os.pwrite(bar1, bytes([byte]), 0) == 1
        finally:
            os.close(bar1)
        assert m.set_state("src", "STOP_COPY") is None
        data = m.read_bytes(m.file("src", "migration/data"), 7)
        assert len(data) == 96
        assert m.set_state("src", "STOP") is None
        assert m.set_state("dst", "RESUMING") is None
        assert m.write("dst", "migration/data", data[:30]) is None
        assert m.write("dst", "migration/data", data[30:]) is None
        assert m.set_state("dst", "RUNNING") is None
        assert m.info("dst")["state_digest"] == m.info("src")["state_digest"]
        bar1 = os.open(m.file("dst", "regions/bar1"), os.O_RDWR)
        try:
            assert b"".join(os.pread(bar1, 1, 0) for _ in range(4)) == b"uart"
        finally:
            os.close(bar1)
        # A stream for one port does not load into a two-port device.
        assert m.set_state("dst", "STOP") is None
        assert m.set_state("dst", "RESUMING") is None
        one_port = data[:16] + (1).to_bytes(4, "little") + data[20:60]
        assert m.write("dst", "migration/data", one_port) == errno.EOPNOTSUPP
