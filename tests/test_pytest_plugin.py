"""The pytest plugin (``fakevfio.pytest_plugin``) and ``fakevfio.testing``.

The plugin is exercised the way another project uses it: pytester writes a
test file and runs pytest on it in a subprocess, with the plugin loaded
through its ``pytest11`` entry point (or ``-p`` while the entry point is not
installed). After each run we check from the outside that nothing stayed
mounted and no server process survived, whatever the inner test did.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from fakevfio import pytest_plugin, testing

pytest_plugins = ["pytester"]


def _plugin_args() -> list[str]:
    """``-p`` for the plugin unless its entry point already loads it (both would clash)."""
    if any(ep.name == "fakevfio" for ep in importlib.metadata.entry_points(group="pytest11")):
        return []
    return ["-p", "fakevfio.pytest_plugin"]


def _mounted(path: str | Path) -> bool:
    """Whether ``path`` is a mount point in this mount namespace (stale ones included)."""
    target = os.fspath(path)
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        return any(line.split()[4] == target for line in f)


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie nobody reaped yet does not count)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _run_inner(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess(*_plugin_args(), "-p", "no:cacheprovider", *args)


def _record(pytester: pytest.Pytester) -> tuple[Path, str]:
    """A file the inner test writes its mounts to, and the snippet that writes it."""
    out = pytester.path / "mounts.json"
    snippet = f"Path({str(out)!r}).write_text(json.dumps([[str(m.path), m.pid] for m in MOUNTS]))"
    return out, snippet


def _start_inner(pytester: pytest.Pytester, testfile: Path, record: Path) -> subprocess.Popen[str]:
    """Run pytest on ``testfile`` in its own session; return once it recorded its mounts.

    Its own session: a signal we send goes to pytest only, so stopping the
    servers is the plugin's job.
    """
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        *_plugin_args(),
        "-p",
        "no:cacheprovider",
        f"--basetemp={pytester.path / 'basetemp'}",
        str(testfile),
    ]
    proc = subprocess.Popen(
        cmd,
        cwd=pytester.path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while not record.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            out = proc.communicate()[0]
            raise AssertionError(f"the inner test did not mount in time:\n{out}")
        time.sleep(0.1)
    time.sleep(0.2)
    return proc


def _assert_all_gone(record: Path) -> None:
    mounts = json.loads(record.read_text())
    assert mounts, "the inner test recorded no mount"
    for path, pid in mounts:
        assert not _mounted(path), f"{path} is still mounted"
        assert not _alive(pid), f"server {pid} for {path} still runs"


# -- without FUSE --------------------------------------------------------------------------
def test_plugin_imports_without_pyfuse3_or_trio() -> None:
    code = textwrap.dedent(
        """
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("pyfuse3", "trio"):
                    raise ImportError(f"blocked {name}")
                return None
        sys.meta_path.insert(0, Block())
        import fakevfio.pytest_plugin, fakevfio.testing
        assert "pyfuse3" not in sys.modules and "trio" not in sys.modules
        print("ok")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_device_args_accepts_mapping_and_cli_specs() -> None:
    assert testing.device_args({"gpu0": "ram:size=64M,seed=1", "nic": "ram"}) == [
        "gpu0=ram:size=64M,seed=1",
        "nic=ram",
    ]
    assert testing.device_args(["a=ram:size=1M"]) == ["a=ram:size=1M"]
    with pytest.raises(TypeError):
        testing.device_args("a=ram")


def test_fuse_problems_names_missing_dev_fuse(tmp_path: Path) -> None:
    problems = testing.fuse_problems(dev_fuse=str(tmp_path / "fuse"), euid=0, cap_bounding_set=None)
    assert any("does not exist" in p and "--device /dev/fuse" in p for p in problems)


def test_fuse_problems_names_missing_fusermount3(tmp_path: Path) -> None:
    problems = testing.fuse_problems(fusermount=None, euid=1000, cap_bounding_set=None)
    assert any(
        "fusermount3 is not installed" in p and "apt-get install fuse3" in p for p in problems
    )


def test_fuse_problems_names_fusermount3_without_setuid(tmp_path: Path) -> None:
    tool = tmp_path / "fusermount3"
    tool.write_bytes(b"")
    tool.chmod(0o755)
    problems = testing.fuse_problems(fusermount=str(tool), euid=1000, cap_bounding_set=None)
    assert any("is not setuid root" in p and "chmod u+s" in p for p in problems)


def test_fuse_problems_names_missing_cap_sys_admin() -> None:
    problems = testing.fuse_problems(euid=0, cap_bounding_set=0)
    assert any("CAP_SYS_ADMIN" in p and "--cap-add SYS_ADMIN" in p for p in problems)


def test_fuse_problems_allow_other_needs_fuse_conf(tmp_path: Path) -> None:
    conf = tmp_path / "fuse.conf"
    conf.write_text("# user_allow_other\n")
    tool = shutil.which("fusermount3") or ""
    problems = testing.fuse_problems(
        allow_other=True,
        fusermount=tool or None,
        euid=1000,
        cap_bounding_set=None,
        fuse_conf=str(conf),
    )
    assert any("user_allow_other" in p for p in problems)
    conf.write_text("user_allow_other\n")
    problems = testing.fuse_problems(
        allow_other=True,
        fusermount=tool or None,
        euid=1000,
        cap_bounding_set=None,
        fuse_conf=str(conf),
    )
    assert not any("user_allow_other" in p for p in problems)


def test_require_fuse_skips_outside_ci_and_fails_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pytest_plugin, "fuse_missing_reason", lambda: "/dev/fuse does not exist")
    monkeypatch.delenv("FAKEVFIO_REQUIRE_FUSE", raising=False)
    monkeypatch.setenv("CI", "false")
    with pytest.raises(pytest.skip.Exception, match="needs FUSE: /dev/fuse does not exist"):
        pytest_plugin.require_fuse()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="/dev/fuse does not exist"):
        pytest_plugin.require_fuse()
    monkeypatch.setenv("FAKEVFIO_REQUIRE_FUSE", "0")
    with pytest.raises(pytest.skip.Exception):
        pytest_plugin.require_fuse()


def _nobody_python(stage: Path, code: str) -> tuple[list[str], dict[str, str]] | str:
    """A Python the user nobody can run ``code`` with fakevfio importable, or why there is none.

    The venv's interpreter may live under a 0700 /root (pyenv); the system
    Python with the checkout and the venv's site-packages on PYTHONPATH serves
    then (same Python minor version, so compiled dependencies load). When the
    checkout itself is under a 0700 home, the packages that ``code`` imports are
    copied into the world-readable ``stage`` and the system Python runs from there.
    """
    if os.geteuid() != 0:
        return "needs root to switch to the user nobody"
    runuser = shutil.which("runuser")
    if runuser is None:
        return "runuser is not installed"
    import attrs  # fakevfio's own imports need its dependencies too

    import fakevfio

    checkout = str(Path(fakevfio.__file__).resolve().parent.parent)
    site = str(Path(attrs.__file__).resolve().parent.parent)
    system = {"PATH": "/usr/bin:/bin"}
    candidates = [
        (sys.executable, dict(os.environ)),
        ("/usr/bin/python3", {**system, "PYTHONPATH": f"{checkout}:{site}"}),
        ("/usr/bin/python3", {**system, "PYTHONPATH": ""}),  # staged copy, made if needed
    ]
    reasons = []
    for python, env in candidates:
        if env.get("PYTHONPATH") == "":
            env["PYTHONPATH"] = _stage_imports(stage, code, (checkout, site))
        done = subprocess.run(
            [runuser, "-u", "nobody", "--", python, "-c", "import fakevfio.testing"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env=env,
        )
        if done.returncode == 0:
            return [runuser, "-u", "nobody", "--", python], env
        reasons.append(f"{python} ({env.get('PYTHONPATH', 'venv')}): {done.stderr.strip()[-200:]}")
    return "nobody cannot run a Python with fakevfio: " + "; ".join(reasons)


def _stage_imports(stage: Path, code: str, roots: tuple[str, ...]) -> str:
    """Copies the top-level packages that running ``code`` imports from ``roots`` into
    ``stage`` (world-readable); returns the directory for PYTHONPATH ("" if none)."""
    lister = (
        f"exec({code!r}); import sys; "
        "print('\\n'.join(getattr(m, '__file__', None) or '' for n, m in "
        "list(sys.modules.items()) if '.' not in n and not n.startswith('_')))"
    )
    done = subprocess.run(
        [sys.executable, "-c", lister], capture_output=True, text=True, timeout=60, check=False
    )
    if done.returncode != 0:
        return ""
    dest = stage / "pythonpath"
    dest.mkdir(mode=0o755)
    for line in done.stdout.splitlines():  # code's own output lines match no root
        path = Path(line)
        # The longest root first: the venv's site-packages may lie inside the checkout.
        root = next(
            (r for r in sorted(roots, key=len, reverse=True) if line.startswith(r + "/")), None
        )
        if root is None or not path.is_file():
            continue
        top = Path(root) / path.relative_to(root).parts[0]
        if top.is_dir() and not (dest / top.name).exists():
            shutil.copytree(top, dest / top.name, ignore=shutil.ignore_patterns("__pycache__"))
        elif top.is_file():
            shutil.copy2(top, dest / top.name)
    # Metadata too: some packages ask importlib.metadata for themselves (crc32c does).
    for root in roots:
        for info in Path(root).glob("*.dist-info"):
            if info.is_dir() and not (dest / info.name).exists():
                shutil.copytree(info, dest / info.name)
    for item in [dest, *dest.rglob("*")]:
        item.chmod(0o755 if item.is_dir() else 0o644)
    return str(dest)


def test_fuse_problems_as_unprivileged_user() -> None:
    """A real ordinary user facing a 0600 root-owned FUSE device and a root-owned mountpoint."""
    base = Path(tempfile.mkdtemp(prefix="fv-nobody-"))
    try:
        base.chmod(0o755)
        dev = base / "fuse"
        dev.write_bytes(b"")
        dev.chmod(0o600)
        mp = base / "mnt"
        mp.mkdir()
        code = (
            "from fakevfio.testing import fuse_problems; "
            f"print('\\n'.join(fuse_problems({str(mp)!r}, dev_fuse={str(dev)!r})))"
        )
        found = _nobody_python(base, code)
        if isinstance(found, str):
            pytest.skip(found)
        command, env = found
        done = subprocess.run(
            [*command, "-c", code],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env=env,
        )
        assert done.returncode == 0, done.stderr
        assert "is not readable and writable by uid 65534" in done.stdout
        assert "no write access to the mountpoint" in done.stdout
    finally:
        shutil.rmtree(base)


def _empty_dir(base: Path) -> Path:
    path = base / "mnt"
    path.mkdir()
    return path


# -- real mounts -----------------------------------------------------------------------------
@pytest.mark.fuse
def test_mount_error_carries_the_servers_stderr(tmp_path: Path) -> None:
    with pytest.raises(testing.MountError, match="nosuchdriver") as info:
        testing.start_mount(_empty_dir(tmp_path), {"a": "nosuchdriver"})
    assert not _mounted(info.value.mountpoint)


@pytest.mark.fuse
def test_context_manager_unmounts_on_keyboard_interrupt(tmp_path: Path) -> None:
    seen: list[testing.Mount] = []

    def body() -> None:
        with testing.mount({"a": "ram:size=1M"}, base_dir=tmp_path) as m:
            seen.append(m)
            assert m.state("a") == "RUNNING"
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        body()
    (m,) = seen
    assert not _mounted(m.path)
    assert m.process.poll() is not None


@pytest.mark.fuse
@pytest.mark.deadline(180)
def test_plugin_mounts_migrates_and_compares_digests(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        textwrap.dedent(
            """
            import errno
            import pytest
            from fakevfio.testing import MigrationFailed

            def test_migrates(vfio_mount, vfio_migrate):
                src = vfio_mount({"gpu0": "ram:size=4M,seed=1", "nic0": "ram:size=1M,seed=2"})
                dst = vfio_mount(["gpu0=ram:size=4M", "nic0=ram:size=1M"])
                assert src.device_names() == ["gpu0", "nic0"]
                result = vfio_migrate(src, dst, options=["--multifd-channels", "3"])
                assert result.ok
                assert result.source["status"] == "completed"
                assert result.dest["status"] == "completed"
                assert set(result.source["devices"]) == {"gpu0/vfio", "nic0/vfio"}
                for name in ("gpu0", "nic0"):
                    assert src.state(name) == "STOP"
                    assert dst.state(name) == "RUNNING"
                    assert dst.digest(name) == src.digest(name)
                    assert dst.config(name) == src.config(name)
                # P2P devices start through RUNNING_P2P, as QEMU does.
                assert dst.log("gpu0")[-2:] == ["STOP RUNNING_P2P", "RUNNING_P2P RUNNING"]

            def test_fault_fails_the_migration(vfio_mount, vfio_migrate):
                src = vfio_mount({"a": "ram:size=1M,seed=3,flags=STOP_COPY"})
                dst = vfio_mount({"a": "ram:size=1M,flags=STOP_COPY"})
                src.set_faults("a", ["arc STOP STOP_COPY EIO"])
                assert src.faults("a") == ["arc STOP STOP_COPY EIO"]
                with pytest.raises(MigrationFailed) as info:
                    vfio_migrate(src, dst)
                assert info.value.result.source["status"] == "failed"
                assert "STOP STOP_COPY EIO" in src.log("a")
                assert src.state("a") == "RUNNING"
                src.clear_faults("a")
                assert vfio_migrate(src, dst, check=False).ok

            def test_state_and_paths(vfio_mount, vfio_migrate):
                m = vfio_mount({"a": "ram:size=1M,flags=STOP_COPY"})
                with pytest.raises(OSError) as info:
                    m.set_state("a", "PRE_COPY")
                assert info.value.errno == errno.EINVAL
                m.set_state("a", "STOP")
                m.set_state("a", "RUNNING")
                m.create("b", "ram", size="1M", flags="STOP_COPY")
                assert m.device_names() == ["a", "b"]
                result = vfio_migrate([m.device("a")], [str(m.device("b")) + ",id=a/vfio"])
                assert result.ok and m.state("b") == "RUNNING"
                m.reset("a")
                assert m.log("a")[-1] == "RESET"
            """
        )
    )
    # Under pytest-xdist, as `make test` runs: the fixtures work in the workers too.
    result = _run_inner(pytester, "-v", "-n", "2", "-p", "xdist")
    result.assert_outcomes(passed=3)


@pytest.mark.fuse
@pytest.mark.deadline(120)
def test_plugin_unmounts_after_a_failing_test(pytester: pytest.Pytester) -> None:
    record, snippet = _record(pytester)
    pytester.makepyfile(
        textwrap.dedent(
            f"""
            import json
            from pathlib import Path

            def test_fails(vfio_mount):
                MOUNTS = [vfio_mount({{"a": "ram:size=1M"}}), vfio_mount({{"b": "ram"}})]
                {snippet}
                assert MOUNTS[0].state("a") == "STOP", "this test fails on purpose"
            """
        )
    )
    result = _run_inner(pytester)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*this test fails on purpose*"])
    _assert_all_gone(record)


@pytest.mark.fuse
@pytest.mark.deadline(120)
def test_plugin_force_unmounts_a_stale_mount(pytester: pytest.Pytester) -> None:
    record, snippet = _record(pytester)
    pytester.makepyfile(
        textwrap.dedent(
            f"""
            import errno, json, os, signal
            from pathlib import Path

            def test_server_dies(vfio_mount):
                m = vfio_mount({{"a": "ram:size=1M"}})
                MOUNTS = [m]
                {snippet}
                os.kill(m.pid, signal.SIGKILL)
                m.process.wait()
                try:
                    os.stat(m.device("a"))
                except OSError as exc:
                    assert exc.errno == errno.ENOTCONN
                else:
                    raise AssertionError("expected a stale mount")
                assert m.is_mounted()
            """
        )
    )
    result = _run_inner(pytester)
    result.assert_outcomes(passed=1)
    _assert_all_gone(record)


@pytest.mark.fuse
@pytest.mark.deadline(120)
def test_plugin_unmounts_after_keyboard_interrupt_in_a_test(pytester: pytest.Pytester) -> None:
    record, snippet = _record(pytester)
    pytester.makepyfile(
        textwrap.dedent(
            f"""
            import json
            from pathlib import Path

            def test_interrupted(vfio_mount):
                MOUNTS = [vfio_mount({{"a": "ram:size=1M"}})]
                {snippet}
                raise KeyboardInterrupt

            def test_never_runs():
                pass
            """
        )
    )
    result = _run_inner(pytester)
    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.stdout.fnmatch_lines(["*KeyboardInterrupt*"])
    _assert_all_gone(record)


@pytest.mark.fuse
@pytest.mark.deadline(120)
def test_plugin_unmounts_when_pytest_gets_sigint(pytester: pytest.Pytester) -> None:
    """Ctrl-C as CI runners send it: SIGINT to the pytest process while a test runs."""
    record, snippet = _record(pytester)
    testfile = pytester.makepyfile(
        textwrap.dedent(
            f"""
            import json, time
            from pathlib import Path

            def test_waits(vfio_mount):
                MOUNTS = [vfio_mount({{"a": "ram:size=1M"}}), vfio_mount({{"b": "ram"}})]
                {snippet}
                time.sleep(60)
            """
        )
    )
    proc = _start_inner(pytester, testfile, record)
    try:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == pytest.ExitCode.INTERRUPTED, out
    assert "KeyboardInterrupt" in out
    _assert_all_gone(record)


@pytest.mark.fuse
@pytest.mark.deadline(120)
def test_killed_pytest_leaves_no_server(pytester: pytest.Pytester) -> None:
    """SIGKILL cannot run finalizers: the servers' parent-death signal unmounts them."""
    record, snippet = _record(pytester)
    testfile = pytester.makepyfile(
        textwrap.dedent(
            f"""
            import json, time
            from pathlib import Path

            def test_waits(vfio_mount):
                MOUNTS = [vfio_mount({{"a": "ram:size=1M"}})]
                {snippet}
                time.sleep(60)
            """
        )
    )
    proc = _start_inner(pytester, testfile, record)
    try:
        proc.kill()
        proc.communicate()
        deadline = time.monotonic() + 20
        for path, pid in json.loads(record.read_text()):
            while (_mounted(path) or _alive(pid)) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert not _mounted(path), f"{path} is still mounted"
            assert not _alive(pid), f"server {pid} still runs"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        for path, _pid in json.loads(record.read_text()) if record.exists() else []:
            testing.force_unmount(path)


@pytest.mark.fuse
@pytest.mark.slow
@pytest.mark.deadline(180)
def test_plugin_under_xdist_two_workers_mount_at_once_and_clean_up_their_own(
    pytester: pytest.Pytester,
) -> None:
    """``-n 2``: each worker's mount is up while the other's is, and each unmounts its own
    (the migration fixtures under xdist: test_plugin_mounts_migrates_and_compares_digests)."""
    pytester.makepyfile(
        textwrap.dedent(
            f"""
            import json, os, time
            from pathlib import Path

            SHARED = Path({str(pytester.path)!r})

            def wait_for(path):
                deadline = time.monotonic() + 60
                while not path.exists():
                    assert time.monotonic() < deadline, f"the other worker never wrote {{path}}"
                    time.sleep(0.05)

            def meet(me, other, mounts):
                (SHARED / f"{{me}}.json").write_text(json.dumps(
                    {{"worker": os.environ["PYTEST_XDIST_WORKER"],
                      "mounts": [[str(m.path), m.pid] for m in mounts]}}))
                wait_for(SHARED / f"{{other}}.json")
                theirs = json.loads((SHARED / f"{{other}}.json").read_text())
                for path, _pid in theirs["mounts"]:  # up at the same time as ours
                    assert os.path.isdir(os.path.join(path, "devices", "g"))
                (SHARED / f"{{me}}.seen").touch()
                wait_for(SHARED / f"{{other}}.seen")  # keep ours up until they looked

            def test_a(vfio_mount):
                meet("a", "b", [vfio_mount({{"g": "ram:size=64K,seed=7"}})])

            def test_b(vfio_mount):
                meet("b", "a", [vfio_mount({{"g": "ram:size=64K,seed=7"}})])
            """
        )
    )
    result = _run_inner(pytester, "-n", "2", "-p", "xdist")
    result.assert_outcomes(passed=2)
    seen = [json.loads((pytester.path / f"{t}.json").read_text()) for t in "ab"]
    assert sorted(s["worker"] for s in seen) == ["gw0", "gw1"]
    for s in seen:  # every worker unmounted its own mounts and stopped their servers
        for path, pid in s["mounts"]:
            assert not _mounted(path), f"{path} is still mounted"
            assert not _alive(pid), f"server {pid} for {path} still runs"
