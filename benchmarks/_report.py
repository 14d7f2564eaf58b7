"""Writing a benchmark report: JSON for machines, Markdown for people, the Markdown echoed."""
import json
import os


def write_report(report: dict, markdown: str, out_dir: str, stem: str) -> str:
    """Writes ``OUT_DIR/STEM.json`` and ``OUT_DIR/STEM.md``, prints the table; returns the path stem."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, stem)
    with open(path + ".json", "w") as f:
        json.dump(report, f, indent=2)
    with open(path + ".md", "w") as f:
        f.write(markdown)
    print(markdown)
    print(f"wrote {path}.json and {path}.md")
    return path
