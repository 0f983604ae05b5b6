"""Put a benchmark's generated table into the README, between its markers.

    python experiments/readme_table.py results/quick          # README.md, marker 'bench:quick'

The table is the harness's own summary.md (it names the command that made it), so no result
in the README is typed by hand. The markers are ``<!-- bench:NAME -->`` and
``<!-- /bench:NAME -->``, NAME the results directory's name.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path


def insert(readme: str, name: str, table: str) -> str:
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if not pattern.search(readme):
        raise SystemExit(f"readme_table: no '{start}' ... '{end}' markers in the README")
    return pattern.sub(lambda _: f"{start}\n{table.rstrip()}\n{end}", readme)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", help="a fedsplitkd-bench output directory (holds summary.md)")
    parser.add_argument("--readme", default="README.md")
    args = parser.parse_args()
    results, readme = Path(args.results), Path(args.readme)
    table = (results / "summary.md").read_text()
    readme.write_text(insert(readme.read_text(), results.name, table))
    print(f"{readme}: table of {results / 'summary.md'} inserted")


if __name__ == "__main__":
    main()
