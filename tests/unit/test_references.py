"""No file of the project cites a document outside it, and every design citation has a target."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SKIP = {".git", ".venv", "__pycache__", ".pytest_cache", ".hypothesis", "build", "dist"}
# A citation of the old out-of-tree design card, a sibling checkout, or a path of the machine
# the project was written on.
OUTSIDE = re.compile(r"DESIGN\.md|\.\./shared\b|(?<![\w.])/work/|(?<![\w.])/home/")


def project_files():
    for path in sorted(ROOT.rglob("*")):
        if path.is_file() and not SKIP.intersection(path.relative_to(ROOT).parts):
            try:
                yield path, path.read_text()
            except (UnicodeDecodeError, OSError):
                continue      # binaries (a built .deb, images)


def test_no_reference_outside_the_repository():
    bad = [f"{p.relative_to(ROOT)}:{n}: {line.strip()[:100]}"
           for p, text in project_files() if p.name != Path(__file__).name
           for n, line in enumerate(text.splitlines(), 1) if OUTSIDE.search(line)]
    assert not bad, "cites something outside the repository:\n" + "\n".join(bad)


def test_design_sections_cited_exist():
    design = (ROOT / "docs" / "design.md").read_text()
    sections = {int(m) for m in re.findall(r"^## (\d+)\. ", design, re.M)}
    cited = {(p.relative_to(ROOT), int(m)) for p, text in project_files()
             for m in re.findall(r"design\.md\)? §(\d+)", text)}
    assert cited and not {c for c in cited if c[1] not in sections}, sorted(cited)
