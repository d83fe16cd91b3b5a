"""The user docs (README.md, docs/*.md, benchmarks/README.md) stay true to the repository.

Checked without running anything heavy: every relative link and heading anchor resolves; every repository path
the text names (configs/, tools/, benchmarks/, detres/, tests/, docs/) exists; every ``detres.x.y`` name is a
module or a top-level name of one; every ``--flag`` given to a ``tools/*.py`` or ``benchmarks/*.py`` command is
defined in that script or the library; README.md stays a front page (<= 150 lines) that links every doc; and no
user doc carries history (commit hashes, issue numbers).
"""

from __future__ import annotations

import ast
import importlib
import re
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 150


def user_docs(root: Path = ROOT) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md")), root / "benchmarks" / "README.md"]


LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
REPO_PATH = re.compile(r"(?<![\w./-])((?:configs|tools|benchmarks|detres|tests|docs)/[\w./-]*\w)")
DOTTED_NAME = re.compile(r"(?<![\w./])detres(?:\.\w+)+")
COMMIT_HASH = re.compile(r"(?<![\w./-])(?=[0-9a-f]*[0-9])(?=[0-9a-f]*[a-f])[0-9a-f]{7,40}(?![\w./-])")
ISSUE_REF = re.compile(r"\bissues?\s*#?\s*\d+|#\d+\b", re.IGNORECASE)
SCRIPT = re.compile(r"(?<![\w./-])((?:tools|benchmarks)/\w+\.py)((?:\s+\S+)*)")
FLAG = re.compile(r"(?<![\w-])--([a-z][\w-]*)")


def slug(heading: str) -> str:
    """GitHub's anchor for a markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*$", _prose(path), re.MULTILINE)}


def _prose(path: Path) -> str:
    """The file without its fenced code blocks (a ``# comment`` in a bash block is no heading)."""
    return re.sub(r"^```.*?^```", "", path.read_text(encoding="utf-8"), flags=re.MULTILINE | re.DOTALL)


def broken_links(path: Path) -> list[str]:
    problems = []
    for target in LINK.findall(_prose(path)):
        if re.match(r"^[a-z]+:", target):  # http:, https:, mailto: — nothing external is checked here
            continue
        file_part, _, fragment = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            problems.append(f"{path.name}: link to missing {target}")
        elif fragment and dest.suffix == ".md" and fragment not in anchors(dest):
            problems.append(f"{path.name}: link to missing heading {target}")
    return problems


def missing_paths(path: Path, root: Path = ROOT) -> list[str]:
    text = path.read_text(encoding="utf-8")
    return [f"{path.name}: names missing {p}" for p in sorted(set(REPO_PATH.findall(text))) if not (root / p).exists()]


@cache
def _top_level_names(module_file: Path) -> frozenset[str]:
    tree = ast.parse(module_file.read_text(encoding="utf-8"))
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.ImportFrom):
            names.update(alias.asname or alias.name for alias in node.names)
    return frozenset(names)


def _resolves_lazily(module: str, attributes: list[str]) -> bool:
    """``module.a.b`` exists, importing ``module`` (its names are imported on first use, e.g. ``detres``)."""
    value = importlib.import_module(module)
    for name in attributes:
        if not hasattr(value, name):
            return False
        value = getattr(value, name)
    return True


def unresolved_names(path: Path, root: Path = ROOT) -> list[str]:
    """``detres.a.b.c``: the longest prefix that is a module or package, then at most one top-level name of it."""
    problems = []
    for dotted in sorted(set(DOTTED_NAME.findall(path.read_text(encoding="utf-8")))):
        parts = dotted.split(".")
        for n in range(len(parts), 0, -1):
            base = root.joinpath(*parts[:n])
            module_file = base / "__init__.py" if base.is_dir() else base.with_suffix(".py")
            if module_file.is_file():
                rest = parts[n:]
                if rest and "__getattr__" in _top_level_names(module_file):  # a lazily exporting package
                    if not _resolves_lazily(".".join(parts[:n]), rest):
                        problems.append(f"{path.name}: {dotted} does not resolve (through {module_file}'s exports)")
                elif len(rest) > 1 or (rest and rest[0] not in _top_level_names(module_file)):
                    problems.append(f"{path.name}: {dotted} does not resolve ({'.'.join(rest)} not in {module_file})")
                break
        else:
            problems.append(f"{path.name}: {dotted} is not a detres module")
    return problems


@cache
def _defined_flags(script: Path, root: Path = ROOT) -> frozenset[str]:
    """Option strings the script or the library spells out (shared argument groups live in detres/)."""
    sources = [script, *sorted((root / "detres").rglob("*.py"))]
    if script.parent.name == "benchmarks":
        sources += sorted(script.parent.glob("*.py"))
    return frozenset(m for f in sources for m in re.findall(r"[\"']--([a-z][\w-]*)[\"']", f.read_text("utf-8")))


def _command_lines(text: str) -> list[str]:
    """Logical lines of the fenced code blocks and inline code spans, backslash continuations joined."""
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)
    lines = [line for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    spans = re.findall(r"`([^`\n]+)`", re.sub(r"^```.*?^```", "", text, flags=re.MULTILINE | re.DOTALL))
    return lines + spans


def undefined_flags(path: Path, root: Path = ROOT) -> list[str]:
    problems = []
    for line in _command_lines(path.read_text(encoding="utf-8")):
        line = line.split(" #")[0]
        for script, args in SCRIPT.findall(line):
            if not (root / script).is_file():
                continue  # reported by missing_paths
            known = _defined_flags(root / script)
            for flag in FLAG.findall(args):
                if flag not in known and not (flag.startswith("no-") and flag[3:] in known):
                    problems.append(f"{path.name}: {script} has no --{flag}")
    return problems


def history_lines(path: Path) -> list[str]:
    problems = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        for pattern, what in ((COMMIT_HASH, "a commit hash"), (ISSUE_REF, "an issue number")):
            match = pattern.search(line)
            if match:
                problems.append(f"{path.name}:{number}: {what} ({match.group(0)!r})")
    return problems


@pytest.mark.parametrize("doc", user_docs(), ids=lambda p: str(p.relative_to(ROOT)))
def test_links_paths_names_and_flags_resolve(doc):
    problems = broken_links(doc) + missing_paths(doc) + unresolved_names(doc) + undefined_flags(doc)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("doc", user_docs(), ids=lambda p: str(p.relative_to(ROOT)))
def test_user_docs_carry_no_history(doc):
    problems = history_lines(doc)
    assert not problems, "history belongs in CHANGELOG.md:\n" + "\n".join(problems)


def test_readme_is_a_front_page_that_links_every_doc():
    readme = ROOT / "README.md"
    lines = readme.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines (at most {README_MAX_LINES})"
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in LINK.findall(_prose(readme)) if not t.startswith("#")}
    orphans = [p.name for p in sorted((ROOT / "docs").glob("*.md")) if p.resolve() not in linked]
    assert not orphans, f"docs not linked from README.md: {orphans}"
    top = "\n".join(lines[:40])
    assert "make demo" in top and "make test" in top, "the two set-up commands belong near the top of README.md"


def test_the_checks_catch_rot(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "tools").mkdir()
    (tmp_path / "detres" / "models").mkdir(parents=True)
    (tmp_path / "detres" / "__init__.py").write_text("")
    (tmp_path / "detres" / "models" / "__init__.py").write_text("")
    (tmp_path / "detres" / "models" / "build.py").write_text("def load_detector():\n    pass\n")
    (tmp_path / "tools" / "infer.py").write_text("p.add_argument('--checkpoint')\np.add_argument('--flip')\n")
    (tmp_path / "docs" / "a.md").write_text("# Title\n")
    doc = tmp_path / "docs" / "b.md"
    doc.write_text(
        "# B\n[ok](a.md#title) [gone](c.md) [bad anchor](a.md#nope) `configs/det/none.yaml`\n"
        "`detres.models.build.load_detector` `detres.models.build.gone` `detres.nothing`\n"
        "```bash\ntools/infer.py --checkpoint M.pt \\\n    --no-flip --bogus\n```\n"
        "fixed in e0a4738 (issue #9); resnet20-12fca82f.th is a file name\n"
    )
    assert broken_links(doc) == ["b.md: link to missing c.md", "b.md: link to missing heading a.md#nope"]
    assert missing_paths(doc, tmp_path) == ["b.md: names missing configs/det/none.yaml"]
    names = unresolved_names(doc, tmp_path)
    assert len(names) == 2 and "detres.models.build.gone" in names[0] and "detres.nothing" in names[1]
    assert undefined_flags(doc, tmp_path) == ["b.md: tools/infer.py has no --bogus"]
    history = history_lines(doc)
    assert len(history) == 2 and "e0a4738" in history[0] and "issue #9" in history[1]
    assert ISSUE_REF.search("see issue 10") and ISSUE_REF.search("Issue #7") and not ISSUE_REF.search("tissue 3D")
