"""Put a benchmark's generated table into the README, between its markers.

    python experiments/readme_table.py results/quick          # README.md, marker 'bench:quick'
    python experiments/readme_table.py results/full --partition dirichlet-0.5   # that partition's rows

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


def rows_of(table: str, partition: str) -> str:
    """The table with only the rows of ``partition`` (its second column); the header lines stay."""
    lines = table.splitlines()
    keep = [line for line in lines if not line.startswith("| ") or line.startswith("| dataset |")
            or line.split("|")[2].strip() == partition]
    if len(keep) == len(lines) - sum(line.startswith("| ") and not line.startswith("| dataset |") for line in lines):
        raise SystemExit(f"readme_table: no row of partition {partition!r} in the table")
    return "\n".join(keep) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", help="a fedsplitkd-bench output directory (holds summary.md)")
    parser.add_argument("--readme", default="README.md")
    parser.add_argument("--partition", default="", help="only this partition's rows ('' = all)")
    args = parser.parse_args()
    results, readme = Path(args.results), Path(args.readme)
    table = (results / "summary.md").read_text()
    if args.partition:
        table = rows_of(table, args.partition)
    readme.write_text(insert(readme.read_text(), results.name, table))
    print(f"{readme}: table of {results / 'summary.md'} inserted")


if __name__ == "__main__":
    main()
