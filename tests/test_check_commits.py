"""scripts/check_commits.py: the commit-message rule CI applies to new commits."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "check_commits.py"


def _git(repo: Path, *args: str) -> str:
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t", "PATH": "/usr/bin:/bin"}
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True,
                          text=True, env=env).stdout.strip()


def _commit(repo: Path, message: str) -> str:
    _git(repo, "commit", "--allow-empty", "-q", "-m", message)
    return _git(repo, "rev-parse", "HEAD")


def _check(repo: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=repo, capture_output=True,
                          text=True)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    _git(tmp_path, "init", "-q")
    return tmp_path


def test_commits_after_the_base_pass_when_subjects_are_short_and_bodies_separated(
    repo: Path,
) -> None:
    base = _commit(repo, "x" * 200)  # before the rule: not checked
    _commit(repo, "Add a thing\n\nWhy it matters, with figures.")
    done = _check(repo, "--base", base)
    assert done.returncode == 0, done.stdout
    assert "1 commits checked, 0 problems" in done.stdout


@pytest.mark.parametrize(("message", "problem"), [
    ("y" * 73, "subject is 73 characters"),
    ("Add a thing.", "ends with a period"),
    ("Add a thing\nbody glued to the subject", "no blank line"),
])
def test_each_broken_rule_is_reported_and_fails(repo: Path, message: str, problem: str) -> None:
    base = _commit(repo, "Start")
    _commit(repo, message)
    done = _check(repo, "--base", base)
    assert done.returncode == 1
    assert problem in done.stdout


def test_a_subject_of_exactly_72_characters_passes(repo: Path) -> None:
    base = _commit(repo, "Start")
    _commit(repo, "z" * 72)
    assert _check(repo, "--base", base).returncode == 0


def test_an_unknown_revision_is_bad_input(repo: Path) -> None:
    _commit(repo, "Start")
    done = _check(repo, "--rev", "no-such-branch")
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1
