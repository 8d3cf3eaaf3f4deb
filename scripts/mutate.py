"""Mutation check: plant one known bug at a time in a scratch copy of the repository and run the
test file that must catch it.

Each mutant (:data:`mutants.MUTANTS`) names a code snippet that occurs exactly once across
``mag/**.py`` (found by text, not by path, so mutants survive file moves), its replacement, the test
file (plus an optional ``-k`` expression) expected to fail, and the bug it plants. A snippet that is
missing or not unique is an error, never a pass. Exit status: 0 every mutant caught, 1 a survivor, 2
an error. Usage: ``python scripts/mutate.py [-j 2] [-o out/mutate.json] [--only ID ...]``
(docs/testing.md).
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mutants import MUTANTS, Mutant  # noqa: E402  (the catalogue lives next to this script)

ROOT = Path(__file__).resolve().parent.parent
# Where snippets are searched, relative to the repository root.
SOURCE_DIR = "mag"
# Not copied into the scratch trees: version control, environments, caches and outputs.
IGNORED = (".git", ".venv", "__pycache__", "*.pyc", ".pytest_cache", ".ruff_cache", "*.egg-info",
           "out")
# A planted bug that hangs a test is reported after this long (counted as caught: the run did not
# pass).
TIMEOUT_S = 300
DEFAULT_JOBS = 2
# pytest exit codes: 0 all passed, 1 some failed, 2 interrupted (e.g. an import error at
# collection).
PASSED, FAILED, INTERRUPTED = 0, 1, 2
OUTPUT_TAIL_CHARS = 2000


@dataclass(frozen=True)
class Located:
    """A mutant with the file (relative to the root) that holds its snippet."""

    mutant: Mutant
    path: str


@dataclass
class Outcome:
    """What running one mutant (or one unmutated target) gave."""

    id: str
    status: str  # caught / survived / error
    detail: str
    seconds: float
    path: str = ""
    test: str = ""
    plants: str = ""


def locate(mutants: Sequence[Mutant], root: Path) -> tuple[list[Located], list[Outcome]]:
    """Find each mutant's snippet: exactly one occurrence across ``root/mag/**.py``, else an
    error."""
    sources = {
        str(p.relative_to(root)): p.read_text() for p in sorted((root / SOURCE_DIR).rglob("*.py"))
    }
    located, errors = [], []
    seen: set[str] = set()
    for m in mutants:
        hits = [(path, text.count(m.snippet)) for path,
                text in sources.items() if m.snippet in text]
        count = sum(n for _, n in hits)
        problem = None
        if m.id in seen:
            problem = "duplicate mutant id"
        elif m.snippet == m.replacement:
            problem = "replacement equals the snippet"
        elif not (root / m.test).is_file():
            problem = f"test file {m.test} not found"
        elif count != 1:
            where = ", ".join(f"{p} x{n}" for p, n in hits) or f"nowhere under {SOURCE_DIR}/"
            problem = f"snippet found {count} times ({where}); it must occur exactly once"
        seen.add(m.id)
        if problem:
            errors.append(Outcome(m.id, "error", problem, 0.0, test=m.test, plants=m.plants))
        else:
            located.append(Located(m, hits[0][0]))
    return located, errors


# Third-party modules the tests import, loaded once per worker before it forks a child per pytest
# run (the imports cost more than most target tests). Never ``mag`` or the tests' own modules: a
# child must import the mutated code fresh.
PRELOAD = ("torch", "numpy", "safetensors.torch", "PIL.Image", "pytest", "torchmetrics",
           "anyio.pytest_plugin")
PRELOAD_ATTRS = (("diffusers", "WanTransformer3DModel"),)


def _tree_env(tree: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree), os.environ.get("PYTHONPATH",
                                                                                   "")]),
            "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}


def serve(preload: bool = True) -> None:
    """Worker loop (``mutate.py --serve``, cwd = a scratch tree): one JSON request per stdin line,
    ``{"args": pytest args, "log": path, "timeout": s}``; fork, run pytest in the child with its
    output in ``log``, answer ``{"code": exit code}`` (-1: timed out, the child's process group
    killed)."""
    import importlib

    for name in PRELOAD if preload else ():
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    for name, attr in PRELOAD_ATTRS if preload else ():
        try:
            getattr(importlib.import_module(name), attr)
        except (ImportError, AttributeError):
            pass
    import gc

    import pytest

    # Preloaded objects never become garbage: freezing them spares every child's collections (pytest
    # collects harder at exit) a walk over torch's heap, which cost more CPU than a small target's
    # tests.
    gc.freeze()
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:  # child: own process group (a timeout kills what the test started too)
            os.setpgid(0, 0)
            os.dup2(os.open(os.devnull, os.O_RDONLY), 0)  # the request pipe is not the tests' stdin
            log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(log, 1)
            os.dup2(log, 2)
            sys.dont_write_bytecode = True
            code = 3
            try:
                code = int(pytest.main(request["args"]))
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        deadline = time.monotonic() + request["timeout"]
        code = None
        while code is None:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                code = os.waitstatus_to_exitcode(status)
            elif time.monotonic() > deadline:
                os.killpg(pid, 9)
                os.waitpid(pid, 0)
                code = -1
            else:
                time.sleep(0.05)
        print(json.dumps({"code": code}), flush=True)


class Worker:
    """A ``--serve`` process whose cwd and first import path is one scratch tree."""

    def __init__(self, tree: Path, preload: bool = True) -> None:
        self.tree = tree
        command = [sys.executable, str(Path(__file__).resolve()), "--serve"]
        command += [] if preload else ["--no-preload"]
        self.proc = subprocess.Popen(command, cwd=tree, env=_tree_env(tree), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)

    def pytest(self, test: str, k: str | None) -> tuple[int, str, float]:
        """Run one test file; (exit code, output tail, seconds)."""
        args = ["-x", "-q", "-p", "no:cacheprovider", test] + (["-k", k] if k else [])
        log = self.tree / "pytest.log"
        start = time.monotonic()
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"args": args, "log": str(log),
                                          "timeout": TIMEOUT_S}) + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline()
        if not answer:
            return 3, "the worker process died", time.monotonic() - start
        code = json.loads(answer)["code"]
        output = f"timed out after {TIMEOUT_S} s" if code == -1 else log.read_text(errors="replace")
        return code, output[-OUTPUT_TAIL_CHARS:], time.monotonic() - start

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait()


def _last_line(output: str) -> str:
    lines = [line for line in output.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def run_baseline(worker: Worker, test: str, k: str | None) -> Outcome:
    """The target must pass unmutated, or a failure would 'catch' every mutant aimed at it."""
    code, output, seconds = worker.pytest(test, k)
    target = test + (f" -k {k!r}" if k else "")
    status = "caught" if code == PASSED else "error"  # "caught" here means: usable as a target
    detail = _last_line(output) if code == PASSED else f"fails unmutated (exit {code}): {output}"
    return Outcome(f"baseline {target}", status, detail, seconds, test=target)


def run_mutant(worker: Worker, item: Located) -> Outcome:
    """Apply ``item`` in the worker's tree, run its test file, restore the file."""
    m = item.mutant
    path = worker.tree / item.path
    original = path.read_text()
    path.write_text(original.replace(m.snippet, m.replacement))
    try:
        code, output, seconds = worker.pytest(m.test, m.k)
    finally:
        path.write_text(original)
    if code in (FAILED, INTERRUPTED):
        status, detail = "caught", _last_line(output)
    elif code == -1:
        status, detail = "caught", output  # a hang is not a pass
    elif code == PASSED:
        status, detail = "survived", _last_line(output)
    else:  # 4 usage error, 5 nothing collected: the target itself is wrong
        status, detail = "error", f"pytest exit {code}: {output}"
    target = m.test + (f" -k {m.k!r}" if m.k else "")
    return Outcome(m.id, status, detail, seconds, item.path, target, m.plants)


def run_all(mutants: Sequence[Mutant], root: Path, jobs: int, *, baseline: bool = True,
            preload: bool = True, log=print) -> list[Outcome]:
    """Locate, check the targets unmutated, then run every mutant on ``jobs`` scratch copies of
    ``root``."""
    located, outcomes = locate(mutants, root)
    if not located:
        return outcomes
    with tempfile.TemporaryDirectory(prefix="mag-mutate-") as scratch:
        workers: queue.Queue[Worker] = queue.Queue()
        for i in range(max(1, jobs)):
            tree = Path(scratch) / f"tree{i}"
            shutil.copytree(root, tree, ignore=shutil.ignore_patterns(*IGNORED), symlinks=True)
            workers.put(Worker(tree, preload))

        def on_tree(fn, *args):
            worker = workers.get()
            try:
                return fn(worker, *args)
            finally:
                workers.put(worker)

        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            broken: set[str] = set()
            # one run per test file, selecting the union of its mutants' -k expressions
            if baseline:
                by_file: dict[str, set[str | None]] = {}
                for x in located:
                    by_file.setdefault(x.mutant.test, set()).add(x.mutant.k)
                targets = sorted((test,
                                  None if None in ks else " or ".join(f"({k})" for k in sorted(ks)))
                                 for test, ks in by_file.items())
                for (test, _), out in zip(targets, pool.map(lambda t: on_tree(run_baseline, *t),
                                                            targets),
                                          strict=True):
                    if out.status == "error":
                        outcomes.append(out)
                        broken.add(test)
                    log(f"  baseline {out.test}: {'passes' if out.status != 'error' else 'FAILS'}"
                        f" ({out.seconds:.1f} s)")
            runnable = [x for x in located if x.mutant.test not in broken]
            for x in located:
                if x not in runnable:
                    outcomes.append(Outcome(x.mutant.id, "error", "its test file fails unmutated",
                                            0.0, x.path, x.mutant.test, x.mutant.plants))
            for out in pool.map(lambda x: on_tree(run_mutant, x), runnable):
                log(f"  {out.status:8s} {out.id:38s} {out.seconds:5.1f} s  {out.path}")
                outcomes.append(out)
        while not workers.empty():
            workers.get().close()
    return outcomes


def exit_code(outcomes: Sequence[Outcome]) -> int:
    """2 on any error, else 1 on any survivor, else 0."""
    statuses = {o.status for o in outcomes}
    return 2 if "error" in statuses else 1 if "survived" in statuses else 0


def main(argv: Sequence[str] | None = None, catalogue: Sequence[Mutant] = MUTANTS) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-j", "--jobs", type=int, default=DEFAULT_JOBS,
                        help="parallel workers, each on its own scratch copy")
    parser.add_argument("-o", "--out", type=Path, help="write the JSON report here")
    parser.add_argument("--only", nargs="+", metavar="ID", help="run only these mutants")
    parser.add_argument("--root", type=Path, default=ROOT, help="repository to copy (default: "
                                                                "this one)")
    parser.add_argument("--no-baseline", action="store_true", help="skip running the targets "
                                                                   "unmutated")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--no-preload", action="store_true",
                        help="workers import nothing ahead (a repository without torch, e.g. a "
                             "toy one)")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(preload=not args.no_preload)
        return 0
    chosen = list(catalogue)
    if args.only:
        unknown = sorted(set(args.only) - {m.id for m in catalogue})
        if unknown:
            print(f"mutate: error: unknown mutant ids {unknown}", file=sys.stderr)
            return 2
        chosen = [m for m in catalogue if m.id in args.only]
    if args.jobs < 1:
        print(f"mutate: error: -j must be at least 1, got {args.jobs}", file=sys.stderr)
        return 2
    if args.list:
        located, errors = locate(chosen, args.root.resolve())
        for x in located:
            k = f" -k {x.mutant.k!r}" if x.mutant.k else ""
            print(f"{x.mutant.id:36s} {x.path:28s} {x.mutant.test}{k}")
        for o in errors:
            print(f"mutate: ERROR {o.id}: {o.detail}", file=sys.stderr)
        return exit_code(errors)
    start = time.monotonic()
    print(f"mutate: {len(chosen)} mutants, {args.jobs} workers, root {args.root}")
    outcomes = run_all(chosen, args.root.resolve(), args.jobs, baseline=not args.no_baseline,
                       preload=not args.no_preload)
    mutant_outcomes = [o for o in outcomes if not o.id.startswith("baseline ")]
    counts = {s: sum(o.status == s for o in mutant_outcomes) for s in ("caught", "survived",
                                                                       "error")}
    elapsed = time.monotonic() - start
    for o in outcomes:
        if o.status != "caught":
            print(f"mutate: {o.status.upper()} {o.id}: {o.plants or o.test}\n    {o.detail}",
                  file=sys.stderr)
    print(f"mutate: {counts['caught']} caught, {counts['survived']} survived, {counts['error']} "
          "errors"
          f" of {len(chosen)} mutants in {elapsed:.0f} s")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        report = {"counts": counts, "seconds": round(elapsed, 1), "jobs": args.jobs,
                  "outcomes": [asdict(o) for o in outcomes]}
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    return exit_code(outcomes)


if __name__ == "__main__":
    sys.exit(main())
