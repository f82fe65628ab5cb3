"""Which moment weight the guard kept in each learned row of a notebook 02 run with several ``learned_moments``
(``make learned-rows``), read from the schedulers it saved (``fit_info["refine"]["moment_weights"]``).

    python scripts/moment_choices.py build/learned_rows/unet-digits/shard-*/out/unet-digits/schedulers

Prints one line per solver x NFE x grid row (the grid alone, D-ODE on a learned grid): the weight kept and every
weight's validation score, then how often each weight was kept, by row.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pandas as pd

NAME = re.compile(r"(?P<solver>.+)-nfe(?P<nfe>\d+)-(?P<variant>learned-grid|dode-learned)$")


def choices(folders) -> pd.DataFrame:
    rows = []
    for folder in map(Path, folders):
        for config in sorted(folder.glob("*/scheduler_config.json")):
            match = NAME.match(config.parent.name)
            if match is None:
                continue
            refine = json.loads(config.read_text()).get("fit_info", {}).get("refine", {})
            if "moment_weights" not in refine:
                continue
            row = {"solver": match["solver"], "nfe": int(match["nfe"]), "variant": match["variant"],
                   "kept_weight": refine["moment_weight"]}
            row.update({f"validation_w{e['weight']:g}": e["validation"] for e in refine["moment_weights"]})
            rows.append(row)
    if not rows:
        raise SystemExit(f"no learned rows with several moment weights under {', '.join(map(str, folders))}")
    return pd.DataFrame(rows).sort_values(["variant", "solver", "nfe"], ignore_index=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", help="notebook 02's schedulers folders")
    parser.add_argument("--out", default=None, help="also write the table here (CSV)")
    args = parser.parse_args(argv)
    table = choices(args.folders)
    print(table.to_markdown(index=False, floatfmt=".4g"))
    print()
    print(pd.crosstab(table.variant, table.kept_weight).to_markdown())
    if args.out:
        table.to_csv(args.out, index=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
