"""Every file that the code, the tests or the docs cite exists in the repository.

Comments and docs point readers at files ("see docs/design.md §4", "[training](docs/training.md)",
"kernels/attention.py"); a citation of a file the reader cannot open is a broken promise. This test
reads every tracked text file, collects repository paths and Markdown links, and checks each exists.
"""
import ast
import io
import re
import subprocess
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEXT_SUFFIXES = {".py", ".md", ".sh", ".yaml", ".yml", ".toml", ".txt", ".h", ".cu", ".cpp", ".cfg"}
FOLDERS = ("fastebm", "kernels", "csrc", "benchmarks", "tests", "docs", "configs", ".ci")
# A repository path: one of the project's folders, then path characters, ending in a file suffix.
REPO_PATH = re.compile(r"(?<![\w./-])((?:%s)/[\w./-]*\w\.(?:py|md|sh|ya?ml|toml|h|cu|cpp|png|json|txt))(?![\w*{<])"
                       % "|".join(re.escape(f) for f in FOLDERS))
# A bare Markdown file name in capitals, such as README.md.
BARE_DOC = re.compile(r"(?<![\w./-])([A-Z][A-Z_]+\.md)\b")
MD_LINK = re.compile(r"\]\(([^)\s#]+)(?:#[^)]*)?\)")
INSTALLED_AS = {"fastebm/kernels/": "kernels/", "fastebm/csrc/": "csrc/"}  # setup.py's package_dir


def tracked_files():
    try:
        out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        files = [ROOT / line for line in out.splitlines()]
    except (OSError, subprocess.CalledProcessError):
        files = [p for p in ROOT.rglob("*") if ".git" not in p.parts]
    return [p for p in files if p.suffix in TEXT_SUFFIXES and p.is_file()]


def exists(cited: str, where: Path) -> bool:
    for installed, source in INSTALLED_AS.items():
        if cited.startswith(installed):
            cited = source + cited[len(installed):]
    return (ROOT / cited).exists() or (where.parent / cited).exists()


def prose(path: Path) -> str:
    """What a reader reads as text: a Python file's comments and docstrings (its other strings are
    data, e.g. a test's fake tool output), any other file whole."""
    text = path.read_text(errors="replace")
    if path.suffix != ".py":
        return text
    parts = [tok.string for tok in tokenize.generate_tokens(io.StringIO(text).readline) if tok.type == tokenize.COMMENT]
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=False)
            if doc:
                parts.append(doc)
    return "\n".join(parts)


def citations(path: Path):
    text = prose(path)
    for m in REPO_PATH.finditer(text):
        yield m.group(1).rstrip(".")
    for m in BARE_DOC.finditer(text):
        yield m.group(1)
    if path.suffix == ".md":
        for m in MD_LINK.finditer(text):
            target = m.group(1)
            if not re.match(r"[a-z]+:", target):  # not a URL
                yield target


def test_every_cited_file_exists():
    missing = sorted({f"{p.relative_to(ROOT)} cites {c}" for p in tracked_files() for c in citations(p)
                      if not exists(c, p)})
    assert not missing, "\n".join(missing)


def test_the_checker_reports_a_missing_file(tmp_path):
    fake = tmp_path / "note.md"
    fake.write_text("see docs/no_such_page.md and [x](missing.png) and NOTES_X.md; docs/design.md is real\n")
    found = list(citations(fake))
    assert "docs/no_such_page.md" in found and "missing.png" in found and "NOTES_X.md" in found
    assert sorted(c for c in found if not exists(c, fake)) == ["NOTES_X.md", "docs/no_such_page.md", "missing.png"]
    code = tmp_path / "mod.py"
    code.write_text('"""Module doc: see docs/gone.md."""\n# comment: kernels/gone.py\nDATA = "tests/not_a_citation.py"\n')
    assert sorted(citations(code)) == ["docs/gone.md", "kernels/gone.py"]
