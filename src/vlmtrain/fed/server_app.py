"""The coordinator's Flower ServerApp: reads the federation plan named by the run config `plan`, runs the rounds
(`fed.coordinator.run_rounds`), writes `COORD/summary.json` and `COORD/final.npz`. It never loads the base model:
the plan's `initial_arrays` are the trainable tensors only. With the plan's `secure_aggregation`, the rounds run
Flower's SecAgg+ workflow (`fed.secagg.run_rounds_secagg`) instead."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from vlmtrain import atomic
from vlmtrain.fed import app_logging

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    from vlmtrain.fed.coordinator import federation_summary, run_rounds
    from vlmtrain.fed.secagg import run_rounds_secagg, secagg_summary

    app_logging()
    plan = json.loads(Path(str(context.run_config["plan"])).read_text())
    coord = Path(plan["coordinator_dir"])
    with np.load(plan["initial_arrays"]) as z:
        initial = {n: z[n] for n in z.files}
    secure = plan.get("secure_aggregation", False)
    state = (run_rounds_secagg if secure else run_rounds)(grid, plan, initial)
    if not state["stopped"]:
        with atomic.replacing(coord / "final.npz", "wb") as f:
            np.savez(f, **state["arrays"])
    atomic.write_json(coord / "summary.json", (secagg_summary if secure else federation_summary)(plan, state),
                      indent=1)
