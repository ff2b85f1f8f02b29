"""`vlmtrain fed ...`: federated training with Flower (`vlmtrain.fed`).

    vlmtrain fed run RECIPE --out OUT [--resume] [--simulation] [overrides]
                                                               the whole federation on 127.0.0.1
    vlmtrain fed privacy-report SITE_DIR [--json]              a site's ledger: ε per dataset over all runs
    vlmtrain fed status OUT                                    the coordinator's checkpoint: rounds done
"""

from __future__ import annotations

import json


def cmd_run(args) -> int:
    from vlmtrain.fed.run import run_loopback

    s = run_loopback(args.recipe, args.out, overrides=args.overrides, resume=args.resume, simulation=args.simulation)
    f, p = s["federated"], s["privacy"]
    print(f"federation: {f['rounds']} rounds ({f['rounds_aggregated']} aggregated) over {len(f['sites'])} sites; "
          f"ε = {p['epsilon']:.3f} at δ = {p['delta']:g} ({p['composition']})")
    for site, v in p["sites"].items():
        print(f"  {site}: ε = {v['epsilon']:.3f} (σ = {v['noise_multiplier']:.3f}, q = {v['sample_rate']:.3f}, "
              f"{v['units']} patients)")
    if "eval" in s:
        print(f"held-out loss {s['eval']['heldout_loss_before']:.4f} → {s['eval']['heldout_loss']:.4f}")
    print(f"written to {args.out}/summary.json")
    return 0


def cmd_privacy_report(args) -> int:
    from vlmtrain.fed.site import site_report

    report = site_report(args.site_dir)
    if args.json:
        print(json.dumps(report))
        return 0
    if not report:
        print(f"{args.site_dir}: no rounds in the ledger")
    for key, v in report.items():
        print(f"dataset {key[:16]}: ε = {v['epsilon']:.4f} at δ = {v['delta']:g} ({v['accountant']}), "
              f"{v['rounds']} rounds, {v['steps']} steps, runs: {', '.join(v['runs'])}")
    return 0


def cmd_status(args) -> int:
    from pathlib import Path

    state = Path(args.out) / "coordinator" / "checkpoint" / "state.json"
    if not state.is_file():
        print(f"{args.out}: no coordinator checkpoint")
        return 1
    s = json.loads(state.read_text())
    for h in s["history"]:
        print(f"round {h['round']}: {len(h['replies'])}/{h['sent']} sites, aggregated={h['aggregated']}, "
              f"{h['seconds']:.1f}s" + (f", errors: {'; '.join(h['errors'])}" if h["errors"] else ""))
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("fed", help="federated training across sites (Flower)",
                       description="Federated DP training with Flower: sites train the stage's connector + LoRA "
                                   "under patient-level DP-SGD on their own data; the coordinator averages.")
    verbs = p.add_subparsers(dest="fed_verb", required=True, metavar="VERB")
    r = verbs.add_parser("run", help="run the whole federation on this machine (SuperLink + SuperNodes on 127.0.0.1)",
                         description="Central stages, site data (gated per site), SuperLink and one SuperNode per "
                                     "site on 127.0.0.1, the Flower run, then OUT/summary.json. Overrides: "
                                     "`federated.rounds=2`, `dp-sft.data.batch_size=8`.")
    r.add_argument("recipe", metavar="RECIPE", help="federated recipe YAML (with a `federated:` block)")
    r.add_argument("--out", required=True, help="run directory")
    r.add_argument("--resume", action="store_true", help="continue from the coordinator's last checkpoint")
    # a flag of `run`, not a verb of its own: a simulation takes the same recipe, overrides, --out and --resume,
    # prepares the same sites and writes the same summary; only the engine under the ServerApp/ClientApp differs
    r.add_argument("--simulation", action="store_true",
                   help="for development: run the sites as virtual nodes on Flower's Simulation Engine (Ray actors "
                        "in this machine's memory; no TLS, no SuperNode processes) instead of the Deployment Engine "
                        "(needs the `fed-sim` extra)")
    r.set_defaults(accepts_overrides=True, func=cmd_run)
    pr = verbs.add_parser("privacy-report", help="a site's privacy ledger (ε over every round of every run)")
    pr.add_argument("site_dir", metavar="SITE_DIR")
    pr.add_argument("--json", action="store_true")
    pr.set_defaults(func=cmd_privacy_report)
    st = verbs.add_parser("status", help="rounds recorded in a federation's coordinator checkpoint")
    st.add_argument("out", metavar="OUT")
    st.set_defaults(func=cmd_status)
