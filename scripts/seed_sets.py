"""Does a table verdict between two fitted schedulers hold on other seeds? Scores schedulers saved by
``make reproduce`` (``results/<model>/schedulers/<solver>-nfe<k>-<variant>``) as notebook 02 scores its table, on
its own evaluation seeds and on ``--sets`` more sets of as many seeds each (the next seeds after them): unet-digits
by FD-digits and pixel FD against the 200-step DDIM samples of the same seeds, gmm-digits by pixel FD against 10,000
samples of the data distribution.

    python scripts/seed_sets.py --model unet-digits --cells ddim:5 ipndm:5 --variants dode-auto dode-learned

``--schedulers`` scores another run's saved schedulers (folders that hold them, e.g. ``make learned-rows``' shards:
``build/learned_rows/unet-digits/shard-*/out/unet-digits/schedulers``); ``--seeds`` gives the sets' first seeds
instead (each set as many seeds as the table's).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="unet-digits")
    parser.add_argument("--cells", nargs="+", required=True, help="solver:nfe")
    parser.add_argument("--variants", nargs="+", default=["dode-auto", "dode-learned"])
    parser.add_argument("--sets", type=int, default=3, help="seed sets beyond the table's own")
    parser.add_argument("--schedulers", nargs="+", type=Path, default=None,
                        help="folders of saved schedulers (default: results/<model>/schedulers)")
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="the sets' first seeds (default: the "
                        "table's, then the next seeds after them)")
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "seed_sets.csv")
    args = parser.parse_args(argv)

    import json

    import torch

    import dode
    from dode.experiments.evaluate import evaluate_scheduler, evaluation_data

    torch.set_num_threads(1)
    folder = ROOT / "results" / args.model
    settings = json.loads((folder / "evaluation.json").read_text())
    num, first = settings["num_samples"], settings["evaluation_seeds"][0]
    features = settings.get("features", ["pixel"])
    model = dode.load_model(args.model)
    folders = args.schedulers or [folder / "schedulers"]

    def saved(name: str) -> Path:
        found = [f / name for f in folders if (f / name).is_dir()]
        if len(found) != 1:
            raise SystemExit(f"{name}: {len(found)} saved schedulers under {', '.join(map(str, folders))}, not one")
        return found[0]

    rows = []
    for seed in args.seeds or [first + k * num for k in range(args.sets + 1)]:
        data = evaluation_data(model, num, seed=seed, reference_samples=10_000 if args.model == "gmm-digits" else num,
                               features=features, fine_nfe=200, progress=False)
        for cell in args.cells:
            solver, nfe = cell.split(":")
            for variant in args.variants:
                scheduler = dode.DODEScheduler.from_pretrained(saved(f"{solver}-nfe{nfe}-{variant}"))
                row = evaluate_scheduler(model, scheduler, int(nfe), data, seed=seed, features=features)
                rows.append({"solver": solver, "nfe": int(nfe), "variant": variant, "seeds": f"{seed}-{seed + num - 1}",
                             **{c: row[c] for c in row if c.startswith("fd_") or c == "rmse_exact"}})
        print(pd.DataFrame(rows).tail(len(args.cells) * len(args.variants)).to_string(), flush=True)
    table = pd.DataFrame(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out, index=False)
    metric = settings.get("metric", "fd_pixel")
    print(table.pivot_table(index=["solver", "nfe", "seeds"], columns="variant", values=metric, sort=False)
          .to_string(float_format=lambda v: f"{v:.4g}"))


if __name__ == "__main__":
    main()
