"""`python -m bench {data,sft,dpo,grpo,anatomy,dp,align,plan,chaos,phi,faces,ocr,prep_medical} [--quick]`: results
in bench/results/, write-up in docs/benchmarks.md. `sft`, `dpo` and `grpo` also take `--family qwen2_5_vl` (a
native transformers VLM: bench.native, bench.grpo)."""

from __future__ import annotations

import argparse
import json
import sys

from bench import align as align_bench
from bench import anatomy as anatomy_bench
from bench import data as data_bench
from bench import dp as dp_bench
from bench import dpo as dpo_bench
from bench import native as native_bench
from bench import sft as sft_bench

BENCHES = {"data": data_bench, "sft": sft_bench, "dpo": dpo_bench, "anatomy": anatomy_bench, "dp": dp_bench,
           "align": align_bench}
BENCHES["plan"] = __import__("bench.plan", fromlist=["run"])  # memory planner vs measured peaks
BENCHES["chaos"] = __import__("bench.chaos", fromlist=["run"])  # kill/resume at random moments: nothing lost
BENCHES["phi"] = __import__("bench.phi", fromlist=["run"])  # report PHI recall: vlmtrain vs PII libraries
BENCHES["grpo"] = __import__("bench.grpo", fromlist=["run"])  # vs trl.GRPOTrainer, G = 8
BENCHES["faces"] = __import__("bench.faces", fromlist=["run"])  # face check: LFW vs medical images
BENCHES["ocr"] = __import__("bench.ocr", fromlist=["run"])  # burned-in PHI on noisy pixels: recall grid
BENCHES["prep_medical"] = __import__("bench.prep_medical", fromlist=["run"])  # the gate on 1,000 records
NATIVE = {"sft": native_bench.run_sft, "dpo": native_bench.run_dpo,
          "grpo": __import__("bench.grpo", fromlist=["run"]).run_native}  # --family: vs TRL on a native VLM
NATIVE_FAMILIES = native_bench.FAMILIES


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description="vlmtrain benchmarks (side by side with peers)")
    p.add_argument("name", choices=sorted(BENCHES))
    p.add_argument("--quick", action="store_true", help="seconds-long smoke run (used by the test suite)")
    p.add_argument("--out", default=None, help="write results JSON here (default: bench/results/<name>.json)")
    p.add_argument("--family", default=None, choices=NATIVE_FAMILIES,
                   help="sft/dpo/grpo only: compare on a native transformers VLM of this family instead of the composed "
                        "LLaVA-shaped model")
    args = p.parse_args(argv)
    if args.family is not None:
        if args.name not in NATIVE:
            names = sorted(NATIVE)
            p.error(f"--family applies to {', '.join(names[:-1])} and {names[-1]} only, not {args.name}")  # exits 2
        result = NATIVE[args.name](args.family, quick=args.quick, out=args.out)
    else:
        result = BENCHES[args.name].run(quick=args.quick, out=args.out)
    print(json.dumps(result["headline"]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
