"""Can a run's checkpoints copy from their context? The copy probe (`model.probes.copy_probe`) on every stage.

Tool calls copy units, numbers and names from the question; needle retrieval copies a passphrase; PPO can only
reward what the policy can already produce. All of it rests on in-context copying (induction). The probe shows each
checkpoint random ordinary tokens twice: NLL of the second showing near 0 means the model copies, equal to the first
(about ln V) means it does not. Printed per checkpoint of a finished pipeline run, for two span lengths, with the
same figures the pipeline logs to MLflow as ``probe/copy_*``. The last line is one JSON object.

    python bench/copy_probe.py --root .lmforge/tiny
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

# bench/model_step.py shares its name with the `model` package: keep this folder off the import path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from model.probes import copy_probe  # noqa: E402
from tasks.pretrain import load_for_inference  # noqa: E402

STAGES = ("pretrain/phase1_short/final", "pretrain/phase2_long/final", "pretrain/phase3_capability/final",
          "sft/train/final", "rlhf/round1/actor", "rlhf/round2/actor", "rlhf/round3/actor")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=".lmforge/tiny", help="a finished pipeline run (its <root>/<run_name>)")
    parser.add_argument("--spans", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--rows", type=int, default=32)
    args = parser.parse_args()
    root = Path(args.root)
    tokenizer = root / "tokenizer" / "tokenizer.json"
    found = [s for s in STAGES if (root / s).is_dir()]
    if not found:
        raise SystemExit(f"no checkpoints under {root}: expected some of {', '.join(STAGES)}")
    figures: dict[str, dict[str, dict[str, float]]] = {}
    print(f"{'checkpoint':<36} {'span':>5} {'first NLL':>10} {'repeat NLL':>11} {'gain':>7}")
    for stage in found:
        model, _ = load_for_inference(str(root / stage), str(tokenizer))
        figures[stage] = {}
        for span in args.spans:
            probe = copy_probe(model, rows=args.rows, span=span)
            figures[stage][str(span)] = probe.as_dict()
            print(f"{stage:<36} {span:>5} {probe.first_nll:>10.3f} {probe.repeat_nll:>11.3f} {probe.gain:>7.3f}")
    vocab = model.config.vocab_size
    print(f"(ln V = {math.log(vocab):.3f}: a model that copies has repeat NLL near 0 and gain near ln V)")
    print(json.dumps({"root": str(root), "vocab_size": vocab, "probe": figures}))


if __name__ == "__main__":
    main()
