"""`vlmtrain privacy audit RUN`: membership inference and canary exposure of a trained stage
(`vlmtrain.train.audit`)."""

from __future__ import annotations

import json


def cmd_audit(args) -> int:
    from vlmtrain.train.audit import run_audit

    result = run_audit(args.run, holdout=args.holdout, max_records=args.max_records)
    if args.json:
        print(json.dumps(result))
        return 0
    m = result["membership"]
    print(f"membership inference (loss threshold): AUC {m['auc']:.3f} over {m['members']} members / "
          f"{m['non_members']} held-out (mean loss {m['member_loss_mean']:.3f} vs {m['non_member_loss_mean']:.3f})")
    if "canaries" in result:
        c = result["canaries"]
        ranks = ", ".join(f"{r['rank']}" for r in c["items"])
        print(f"canary exposure: mean {c['exposure_mean']:.2f} bits of {c['exposure_max_possible']:.2f} "
              f"(ranks of the true secrets among 1000: {ranks})")
    if "privacy" in result:
        p = result["privacy"]
        print(f"trained with DP-SGD: ε = {p['epsilon']:.3f} at δ = {p['delta']:g} (σ = {p['noise_multiplier']:.3f}, "
              f"{p['steps']} steps)")
    print(f"written to {result['stage']}/privacy_audit.json")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("privacy", help="privacy tools: audit a trained stage",
                       description="Privacy tools. `audit`: empirical leakage of a trained stage.")
    verbs = p.add_subparsers(dest="privacy_verb", required=True, metavar="VERB")
    a = verbs.add_parser(
        "audit", help="membership-inference AUC and canary exposure of a trained stage",
        description="Loss-threshold membership inference (training records vs held-out records: AUC, 0.5 = no "
                    "leak) and secret-sharer canary exposure (canaries planted by the stage's `audit:` block). "
                    "Writes STAGE/privacy_audit.json.")
    a.add_argument("run", metavar="RUN", help="a stage directory, or a recipe run directory (its audited stage)")
    a.add_argument("--holdout", default=None, metavar="SHARDS",
                   help="held-out shards (non-members; default: the stage's audit.holdout)")
    a.add_argument("--max-records", type=int, default=None, help="members and non-members scored, at most, each")
    a.add_argument("--json", action="store_true", help="print the result as one JSON object")
    a.set_defaults(func=cmd_audit)
