"""scripts/mutate.py on a toy repository: a planted bug is caught, a harmless change survives, a
snippet that is missing or not unique is an error (exit 2), and the source tree is never
modified."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def _load_mutate():
    spec = importlib.util.spec_from_file_location("mutate", SCRIPTS / "mutate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("mutate", module)
    spec.loader.exec_module(module)
    return module


mutate = _load_mutate()
Mutant = mutate.Mutant
TOY = "def add(a, b):\n    return a + b\n\n\ndef half(x):\n    return x / 2\n"
TOY_TEST = "from mag.toy import add\n\n\ndef test_add():\n    assert add(2, 3) == 5\n"
BROKEN_TEST = "def test_broken():\n    assert False\n"


def _toy_repo(root: Path) -> Path:
    (root / "mag").mkdir(parents=True)
    (root / "tests").mkdir()
    (root / "mag" / "__init__.py").write_text("")
    (root / "mag" / "toy.py").write_text(TOY)
    (root / "tests" / "test_toy.py").write_text(TOY_TEST)
    (root / "tests" / "test_broken.py").write_text(BROKEN_TEST)
    return root


def test_a_planted_bug_is_caught_a_harmless_one_survives_and_a_failing_target_is_an_error(tmp_path):
    root = _toy_repo(tmp_path / "repo")
    catalogue = (
        Mutant("minus", "return a + b", "return a - b", "tests/test_toy.py", "add", "subtracts"),
        Mutant("commuted", "return a + b", "return b + a", "tests/test_toy.py", None, "nothing "
                                                                                      "observable"),
        Mutant("halved", "return x / 2", "return x // 2", "tests/test_broken.py", None, "an "
                                                                                        "untested "
                                                                                        "change"),
    )
    out = tmp_path / "report.json"
    code = mutate.main(["--root", str(root), "-j", "2", "--no-preload", "-o", str(out)],
                       catalogue=catalogue)
    report = json.loads(out.read_text())
    status = {
        o["id"]: o["status"] for o in report["outcomes"] if not o["id"].startswith("baseline ")
    }
    assert status == {"minus": "caught", "commuted": "survived", "halved": "error"}
    assert report["counts"] == {"caught": 1, "survived": 1, "error": 1}
    assert code == 2  # an error outranks a survivor
    # mutants only ever touch the scratch copies
    assert (root / "mag" / "toy.py").read_text() == TOY
    code = mutate.main(["--root", str(root), "-j", "1", "--no-preload", "--only", "minus",
                        "commuted"],
                       catalogue=catalogue)
    assert code == 1


def test_a_missing_or_repeated_snippet_is_an_error_not_a_pass(tmp_path, capsys):
    root = _toy_repo(tmp_path / "repo")
    catalogue = (
        Mutant("gone", "return a * b", "return a / b", "tests/test_toy.py", None, "code that "
                                                                                  "moved away"),
        Mutant("twice", "    return ", "    return -", "tests/test_toy.py", None, "an ambiguous "
                                                                                  "snippet"),
    )
    assert mutate.main(["--root", str(root), "--no-preload"], catalogue=catalogue) == 2
    err = capsys.readouterr().err
    assert "ERROR gone" in err and "found 0 times" in err
    assert "ERROR twice" in err and "found 2 times (mag/toy.py x2)" in err
    assert mutate.main(["--root", str(root), "--only", "nope"], catalogue=catalogue) == 2


def test_every_shipped_snippet_occurs_exactly_once():
    located, errors = mutate.locate(mutate.MUTANTS, SCRIPTS.parent)
    assert errors == [] and len(located) >= 40
