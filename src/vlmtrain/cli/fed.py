"""`vlmtrain fed ...`: federated training with Flower (`vlmtrain.fed`).

    vlmtrain fed run RECIPE --out OUT [--resume] [--simulation] [overrides]
                                                               the whole federation on 127.0.0.1
    vlmtrain fed privacy-report SITE_DIR [--json]              a site's ledger: ε per dataset over all runs
    vlmtrain fed status OUT                                    the coordinator's checkpoint: rounds done
A federation over several hosts (docs/federated.md#a-real-multi-host-deployment):
    vlmtrain fed certs --out DIR --host HOST                   a CA + SuperLink certificate (tests, small consortia)
    vlmtrain fed site-key --out DIR --name SITE                a site's key pair; its .pub goes to the coordinator
    vlmtrain fed coordinator RECIPE --out OUT --host H --port P --tls-dir DIR --site-key SITE=PUB ... [--resume]
    vlmtrain fed site --superlink H:P --name SITE --site-dir DIR --base-model DIR --root-cert CA --key KEY
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from vlmtrain.errors import ConfigError


def cmd_run(args) -> int:
    from vlmtrain.fed.run import run_loopback

    return _report(run_loopback(args.recipe, args.out, overrides=args.overrides, resume=args.resume,
                                simulation=args.simulation), args.out)


def cmd_coordinator(args) -> int:
    from vlmtrain.fed.run import run_coordinator

    keys = {}
    for item in args.site_key:
        name, sep, path = item.partition("=")
        if not sep or not name or not Path(path).is_file():
            raise ConfigError(f"--site-key {item}: expected SITE=PUBLIC_KEY_FILE with an existing file")
        keys[name] = Path(path)
    return _report(run_coordinator(args.recipe, args.out, args.host, args.port, args.tls_dir, keys,
                                   overrides=args.overrides, resume=args.resume,
                                   online_timeout_s=args.online_timeout), args.out)


def cmd_site(args) -> int:
    """Checks what a site can check before joining (a passing gate report, the base model), then becomes the site's
    Flower SuperNode (exec: the same PID, so a scheduler's or operator's signal reaches it)."""
    from vlmtrain.fed.deploy import flower_env, supernode_command  # lazy: keeps `vlmtrain --help` fast
    from vlmtrain.fed.site_data import check_gate_report  # lazy: keeps `vlmtrain --help` fast

    site_dir = Path(args.site_dir)
    check_gate_report(site_dir / "shards")
    if not any((Path(args.base_model) / f).is_file() for f in ("vlmtrain_model.yaml", "config.json")):
        raise ConfigError(f"--base-model {args.base_model}: not a model folder (the output of the recipe's central "
                          "stages, e.g. OUT/public/model, copied to this host)")
    if (args.insecure and (args.root_cert or args.key)) or (not args.insecure and not (args.root_cert and args.key)):
        raise ConfigError("fed site: give --root-cert CA and --key PRIVATE_KEY (TLS + SuperNode authentication), "
                          "or --insecure for a test on one machine")
    cmd = supernode_command(args.superlink, args.name, site_dir, Path(args.base_model), args.root_cert, args.key,
                            args.max_retries)
    env = flower_env(site_dir / "flwr-home")
    print(f"site {args.name}: joining {args.superlink} as a Flower SuperNode", flush=True)
    os.execve(cmd[0], cmd, env)
    return 0  # not reached


def cmd_certs(args) -> int:
    from vlmtrain.fed.certs import make_tls  # lazy: keeps `vlmtrain --help` fast

    paths = make_tls(args.out, hosts=tuple(args.host), days=args.days)
    print("\n".join(f"{k}: {v}" for k, v in paths.items()))
    return 0


def cmd_site_key(args) -> int:
    from vlmtrain.fed.certs import make_site_key  # lazy: keeps `vlmtrain --help` fast

    keys = make_site_key(args.out, args.name)
    print(f"private (stays at the site): {keys['private']}\npublic (to the coordinator): {keys['public']}")
    return 0


def _report(s: dict, out) -> int:
    f, p = s["federated"], s["privacy"]
    print(f"federation: {f['rounds']} rounds ({f['rounds_aggregated']} aggregated) over {len(f['sites'])} sites; "
          f"ε = {p['epsilon']:.3f} at δ = {p['delta']:g} ({p['composition']})")
    for site, v in p["sites"].items():
        print(f"  {site}: ε = {v['epsilon']:.3f} (σ = {v['noise_multiplier']:.3f}, q = {v['sample_rate']:.3f}, "
              f"{v['units']} patients)")
    if "eval" in s:
        print(f"held-out loss {s['eval']['heldout_loss_before']:.4f} → {s['eval']['heldout_loss']:.4f}")
    print(f"written to {out}/summary.json")
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
    c = verbs.add_parser("coordinator", help="the coordinator of a multi-host federation (SuperLink + the run)",
                         description="Central stages and the plan, a SuperLink bound to HOST:PORT with TLS and "
                                     "SuperNode authentication, each site's public key registered; once every site is "
                                     "online (`vlmtrain fed site` on its host) the run, then OUT/summary.json.")
    c.add_argument("recipe", metavar="RECIPE")
    c.add_argument("--out", required=True, help="run directory (the coordinator's side)")
    c.add_argument("--host", default="0.0.0.0", help="address the SuperLink binds (default: all interfaces)")
    c.add_argument("--port", type=int, default=9092, help="the SuperLink's port (Fleet, Control, ServerAppIo API)")
    c.add_argument("--tls-dir", required=True, help="ca.crt, server.pem, server.key (`vlmtrain fed certs`)")
    c.add_argument("--site-key", action="append", default=[], metavar="SITE=PUB",
                   help="a site's public key file (`vlmtrain fed site-key`); one per site of the recipe")
    c.add_argument("--online-timeout", type=float, default=600.0, help="seconds to wait for every site to join")
    c.add_argument("--resume", action="store_true", help="continue from the coordinator's last checkpoint")
    c.set_defaults(accepts_overrides=True, func=cmd_coordinator)
    si = verbs.add_parser("site", help="join a federation as one site (its Flower SuperNode)",
                          description="Checks the site's gate report and base model, then runs the site's Flower "
                                      "SuperNode until stopped; the coordinator's rounds arrive as messages.")
    si.add_argument("--superlink", required=True, metavar="HOST:PORT")
    si.add_argument("--name", required=True, help="the site's name, as in the recipe and its registered key")
    si.add_argument("--site-dir", required=True, help="the site's directory: shards/ with the gate's report, ledger")
    si.add_argument("--base-model", required=True, help="the base model folder (the recipe's central stages' output)")
    si.add_argument("--root-cert", help="the consortium's CA certificate (TLS)")
    si.add_argument("--key", help="the site's private key (its public key is registered at the coordinator)")
    si.add_argument("--insecure", action="store_true", help="no TLS, no authentication (one-machine tests only)")
    si.add_argument("--max-retries", type=int, default=None, help="connection retries (default: unlimited)")
    si.set_defaults(func=cmd_site)
    ce = verbs.add_parser("certs", help="a CA and a SuperLink certificate for HOST (for tests and small consortia)")
    ce.add_argument("--out", required=True)
    ce.add_argument("--host", action="append", required=True, help="the coordinator's host name or IP (repeatable)")
    ce.add_argument("--days", type=int, default=365)
    ce.set_defaults(func=cmd_certs)
    sk = verbs.add_parser("site-key", help="a site's key pair for SuperNode authentication")
    sk.add_argument("--out", required=True)
    sk.add_argument("--name", required=True)
    sk.set_defaults(func=cmd_site_key)
    st = verbs.add_parser("status", help="rounds recorded in a federation's coordinator checkpoint")
    st.add_argument("out", metavar="OUT")
    st.set_defaults(func=cmd_status)
