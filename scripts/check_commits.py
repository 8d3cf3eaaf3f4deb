"""Check commit messages since a base commit: subject <= 72 characters, no trailing period, and a
blank line between subject and body.

Commits before BASE (the history this rule was introduced on) are not checked. Usage:
    python scripts/check_commits.py [--base SHA] [--rev HEAD]
Exit 0 when every checked commit passes, 1 with one line per offending commit otherwise, 2 on bad
input (unknown revision). A shallow clone that lacks BASE checks the commits it has.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

SUBJECT_MAX_CHARS = 72
# The last commit before the rule: every commit after it is checked.
DEFAULT_BASE = "0776c74"
RECORD_SEPARATOR = "\x1e"


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], check=True, capture_output=True, text=True).stdout


def problems(message: str) -> list[str]:
    """What is wrong with one commit message (empty when it follows the rule)."""
    lines = message.rstrip("\n").split("\n")
    subject = lines[0]
    found = []
    if len(subject) > SUBJECT_MAX_CHARS:
        found.append(f"subject is {len(subject)} characters (at most {SUBJECT_MAX_CHARS})")
    if subject.endswith("."):
        found.append("subject ends with a period")
    if not subject.strip():
        found.append("empty subject")
    if len(lines) > 1 and lines[1].strip():
        found.append("no blank line between subject and body")
    return found


def _revision_range(base: str, rev: str) -> str:
    try:
        _git("cat-file", "-e", f"{base}^{{commit}}")
    except subprocess.CalledProcessError:
        return rev  # shallow clone without the base: check what is here
    return f"{base}..{rev}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default=DEFAULT_BASE, help="last unchecked commit")
    parser.add_argument("--rev", default="HEAD", help="newest commit to check")
    args = parser.parse_args(argv)
    try:
        _git("rev-parse", "--verify", f"{args.rev}^{{commit}}")
        log = _git("log", "--no-merges", f"--format=%h %B{RECORD_SEPARATOR}",
                   _revision_range(args.base, args.rev))
    except subprocess.CalledProcessError as error:
        print(f"check_commits: {error.stderr.strip() or error}", file=sys.stderr)
        return 2
    bad = 0
    checked = 0
    for record in filter(str.strip, log.split(RECORD_SEPARATOR)):
        sha, _, message = record.strip("\n").partition(" ")
        checked += 1
        for problem in problems(message):
            bad += 1
            print(f"{sha}: {problem}: {message.splitlines()[0][:80]!r}")
    print(f"check_commits: {checked} commits checked, {bad} problems")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
