"""The scripts' share-the-cells pattern: one process per share, each the same script with ``--worker k jobs``
appended, which writes its share's rows as CSV on stdout; the shares' rows together."""
from __future__ import annotations

import subprocess
from io import StringIO

import pandas as pd


def spread(command: list, jobs: int) -> pd.DataFrame:
    """Run ``command + ["--worker", k, jobs]`` for k < ``jobs`` at once and concatenate their CSV outputs."""
    workers = [subprocess.Popen([*command, "--worker", str(k), str(jobs)], stdout=subprocess.PIPE, text=True)
               for k in range(jobs)]
    outputs = [w.communicate()[0] for w in workers]
    if any(w.returncode for w in workers):
        raise SystemExit(f"a worker failed (exit codes {[w.returncode for w in workers]})")
    return pd.concat([pd.read_csv(StringIO(o)) for o in outputs], ignore_index=True)
