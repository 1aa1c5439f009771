"""README's examples, run as a newcomer pastes them.

The tour's shell block runs in bash against a real mount, each line checked for
its exit status and, where the block says ``# -> OUTPUT``, for exactly that
output; the plugin's three snippets (driver, ``pyproject.toml``, tests) are
installed by pip as written and their tests run; ``make demo``'s output is
compared line by line with the block README shows. What checks each result is
not ours: bash, pip's build of the snippet's ``pyproject.toml``, pytest.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_examples import _can_build_without_isolation

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(heading: str, language: str) -> list[str]:
    """The fenced ``language`` blocks of the README section under ``heading``."""
    start = README.index(f"\n{heading}\n")
    end = README.find("\n## ", start + len(heading) + 2)
    blocks: list[str] = []
    fence: str | None = None  # the open block's language
    for line in README[start : end if end != -1 else len(README)].splitlines(keepends=True):
        if line.startswith("```"):
            if fence is None:
                fence = line[3:].strip()
                blocks.append("")
                continue
            if fence != language:
                blocks.pop()
            fence = None
        elif fence is not None:
            blocks[-1] += line
    return blocks


def _expected(comment: str) -> re.Pattern[str]:
    """``# -> a / b N``: the lines ``a`` and ``b <number>``."""
    lines = [
        " ".join(r"\d+" if word == "N" else re.escape(word) for word in part.split())
        for part in comment.split(" / ")
    ]
    return re.compile("\n".join(lines) + r"\n?")


@pytest.mark.fuse
@pytest.mark.deadline(120)
def test_readme_tour_runs_as_pasted(tmp_path: Path) -> None:
    (tour,) = _blocks("## A tour of the filesystem", "sh")
    bindir = Path(sys.executable).parent
    activate = bindir / "activate"
    assert (bindir / "fakevfio").exists(), f"no fakevfio command beside {sys.executable}"
    src, rest = tmp_path / "src", tmp_path / "rest.bin"
    script: list[str] = []
    checks: list[tuple[int, str, str]] = []
    for index, line in enumerate(tour.splitlines()):
        command, _, comment = (part.strip() for part in line.partition(" # "))
        command = command.replace("/tmp/src", str(src)).replace("/tmp/rest.bin", str(rest))
        if command == "source .venv/bin/activate" and not activate.exists():
            command = f"export PATH={shlex.quote(str(bindir))}:$PATH"  # not a venv here
        elif command == "source .venv/bin/activate":
            command = f"source {shlex.quote(str(activate))}"
        prefix = tmp_path / f"line{index}"
        script.append(f"{{ {command}\n}} >{prefix}.out 2>{prefix}.err; echo $? >{prefix}.rc")
        checks.append((index, line, comment))
    try:
        subprocess.run(["bash", "-c", "\n".join(script)], cwd=ROOT, timeout=90, check=True)
    finally:
        if os.path.ismount(src):
            subprocess.run(["fusermount3", "-u", "-z", str(src)], check=False)
    for index, line, comment in checks:
        base = tmp_path / f"line{index}"
        rc = int((base.with_suffix(".rc")).read_text())
        out, err = base.with_suffix(".out").read_text(), base.with_suffix(".err").read_text()
        where = f"README tour line {line!r}"
        if comment.startswith("fails: "):
            errno_name = comment.removeprefix("fails: ").split(",")[0]
            assert rc != 0, f"{where} succeeded; README says it fails with {errno_name}"
            assert os.strerror(getattr(errno, errno_name)) in err, (where, err)
            continue
        assert rc == 0, f"{where} exited {rc}: {err}"
        if comment.startswith("-> "):
            assert _expected(comment.removeprefix("-> ")).fullmatch(out), f"{where} printed {out!r}"
    assert not os.path.ismount(src), "the tour's last line leaves nothing mounted"


def test_readme_plugin_snippets_install_and_their_tests_pass(tmp_path: Path) -> None:
    blocks = _blocks("## Writing a driver plugin", "python")
    (toml,) = _blocks("## Writing a driver plugin", "toml")
    (driver,) = [b for b in blocks if b.startswith("# mydriver/__init__.py")]
    (tests,) = [b for b in blocks if b.startswith("# test_mydriver.py")]
    project = tmp_path / "plugin"
    (project / "mydriver").mkdir(parents=True)
    (project / "mydriver" / "__init__.py").write_text(driver)
    (project / "pyproject.toml").write_text(toml)
    site = tmp_path / "site"
    install = [sys.executable, "-m", "pip", "install", "--no-deps", "--quiet"]
    if _can_build_without_isolation():
        install += ["--no-build-isolation", "--no-index"]
    subprocess.run([*install, "--target", str(site), str(project)], check=True, timeout=300)
    env = {**os.environ, "PYTHONPATH": str(site)}
    listed = subprocess.run(
        [sys.executable, "-m", "fakevfio", "drivers", "--json"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    drivers = json.loads(listed.stdout)
    assert drivers["drivers"]["scratchpad"]["description"] == "64 KiB of scratch memory"
    assert drivers["errors"] == [], drivers["errors"]
    (tmp_path / "test_mydriver.py").write_text(tests)
    ran = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_mydriver.py"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "2 passed" in ran.stdout, ran.stdout


@pytest.mark.fuse
@pytest.mark.deadline(120)
def test_readme_demo_block_is_what_make_demo_prints() -> None:
    (shown,) = [
        b
        for b in _blocks("## Two commands", "")
        if "state_digest EQUAL" in b  # the block after "make demo prints ..."
    ]
    ran = subprocess.run(
        [sys.executable, "-m", "fakevfio.demo"], capture_output=True, text=True, timeout=100
    )
    assert ran.returncode == 0, ran.stdout + ran.stderr
    printed = ran.stdout.splitlines()
    digest = r"\([0-9a-f]{16}\.\.\.\)"  # varies by run: the workload dirties by wall time
    for line in shown.splitlines():
        pattern = digest.join(re.escape(part) for part in re.split(digest, line))
        assert any(re.fullmatch(pattern, p) for p in printed), (line, ran.stdout)


@pytest.mark.fuse
@pytest.mark.deadline(120)
def test_users_guide_downtime_example_runs_as_written(tmp_path: Path) -> None:
    guide = (ROOT / "docs" / "users.md").read_text()
    start = guide.index("\n## 3. Someone measuring downtime\n")
    blocks = re.findall(r"^```sh\n(.*?)^```$", guide[start:], flags=re.MULTILINE | re.DOTALL)
    example = next(b for b in blocks if "migrator migrate" in b)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Smaller devices (the example's 1G would take a minute of CI), a free port, tmp paths.
    script = (
        example.replace("size=1G", "size=32M")
        .replace("127.0.0.1:4444", f"127.0.0.1:{port}")
        .replace("/tmp/src", str(tmp_path / "src"))
        .replace("/tmp/dst", str(tmp_path / "dst"))
    )
    (tmp_path / "src").mkdir()
    (tmp_path / "dst").mkdir()
    bindir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}"}
    try:
        ran = subprocess.run(
            ["bash", "-c", script], env=env, capture_output=True, text=True, timeout=90
        )
    finally:
        for side in ("src", "dst"):
            if os.path.ismount(tmp_path / side):
                subprocess.run(["fusermount3", "-u", "-z", str(tmp_path / side)], check=False)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    reports = [json.loads(line) for line in ran.stdout.splitlines() if line.startswith("{")]
    assert len(reports) == 2, ran.stdout  # the destination's and the source's --json
    assert [r["status"] for r in reports] == ["completed", "completed"], reports
    source = max(reports, key=lambda r: r["downtime_ms"])
    assert source["downtime_ms"] > 0
    assert source["devices"]["gpu0/vfio"]["total_bytes"] > 32 << 20
