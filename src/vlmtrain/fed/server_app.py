"""The coordinator's Flower ServerApp: reads the federation plan named by the run config `plan`, runs the rounds
(`fed.coordinator.run_rounds`), writes `COORD/summary.json` and `COORD/final.npz`. It never loads the base model:
the plan's `initial_arrays` are the trainable tensors only."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    from vlmtrain.fed.coordinator import federation_summary, run_rounds
    from vlmtrain.fed.ledger import write_json_atomic

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    plan = json.loads(Path(str(context.run_config["plan"])).read_text())
    coord = Path(plan["coordinator_dir"])
    with np.load(plan["initial_arrays"]) as z:
        initial = {n: z[n] for n in z.files}
    state = run_rounds(grid, plan, initial)
    if not state["stopped"]:
        tmp = coord / "final.tmp.npz"
        np.savez(tmp, **state["arrays"])
        tmp.replace(coord / "final.npz")
    write_json_atomic(coord / "summary.json", federation_summary(plan, state))
