"""Luffy's sequence migration in the bundled runtime, measured against the flat all-to-all.

Trains tiny-moe on 4 gloo ranks (EP 4, two pretend nodes of 2 ranks) twice with the same seed: the flat
all-to-all, then the same with ``--sequence-migration``. Migration is exact, so both runs route the
same tokens to the same experts (the script checks the loss curves are equal) and their byte counts
compare like for like (float32 summation order differs, so over many steps at this learning rate the
curves drift apart and a few routing choices with them: keep the runs short). It prints, per step and
over all ranks:

- the flat combine (expert outputs sent back to the tokens' ranks);
- under migration, the combine (outputs sent to where each sequence continues) and the ``migration``
  rows (the residual stream of the sequences that move: pre-norm blocks need it; Luffy's post-norm
  models did not), and the metadata (destinations, weights, ids, labels);
- the share of the flat combine saved counting the combine alone (Luffy's accounting, and the cost
  model's ``migration_saved_fraction``, whose uniform-routing figure is printed beside it), and
  counting everything migration sends;
- the fraction of (sequence, layer) decisions that moved a sequence.

Usage: python benchmarks/sequence_migration.py [--steps N] [--seq-len S]   (about a minute on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from planner.catalog import load_model
from planner.costmodel.routing import migration_saved_fraction


def run(steps: int, seq_len: int, migrate: bool) -> dict[str, object]:
    command = [
        sys.executable, "-m", "planner", "run", "--model", "tiny-moe", "--nproc", "4", "--ranks-per-node", "2",
        "--ep", "4", "--steps", str(steps), "--seq-len", str(seq_len), "--json",
    ]  # fmt: skip
    if migrate:
        command.append("--sequence-migration")
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"moeplan run failed ({done.returncode}):\n{done.stderr[-2000:]}")
    record: dict[str, object] = json.loads(done.stdout)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--seq-len", type=int, default=64)
    args = parser.parse_args()
    flat, migrated = run(args.steps, args.seq_len, False), run(args.steps, args.seq_len, True)
    losses = [[step["loss"] for step in r["steps"]] for r in (flat, migrated)]  # type: ignore[attr-defined, index]
    drift = max(abs(a - b) / abs(a) for a, b in zip(*losses, strict=True))
    kinds_flat: dict[str, float] = flat["bytes_per_collective"]  # type: ignore[assignment]
    kinds: dict[str, float] = migrated["bytes_per_collective"]  # type: ignore[assignment]
    combine_flat, combine, moved = kinds_flat["combine"], kinds["combine"], kinds["migration"]
    metadata = kinds.get("migration_metadata", 0.0)
    model = load_model("tiny-moe")
    predicted = migration_saved_fraction(args.seq_len * (model.moe_router_topk or 1), 4)
    print(f"tiny-moe, 4 gloo ranks (EP 4, 2 pretend nodes), sequence {args.seq_len}, {args.steps} steps")
    print(
        f"loss curves: largest relative difference {drift:.1e}; final {losses[0][-1]:.4f} / {losses[1][-1]:.4f}"
    )
    print(f"sequences moved per (sequence, MoE layer): {migrated['migrated_fraction']:.1%}")
    print("bytes per step, all ranks (forward; the backward sends the same again):")
    print(f"  flat combine                      {combine_flat:12,.0f}")
    print(f"  migration: combine                {combine:12,.0f}")
    print(f"  migration: residual rows moved    {moved:12,.0f}")
    print(f"  migration: metadata               {metadata:12,.0f}")
    print(f"combine saved, combine alone (Luffy's count)   {1 - combine / combine_flat:7.1%}")
    print(f"  cost model, uniform routing                  {predicted:7.1%}")
    print(
        f"combine saved, all migration sends             {1 - (combine + moved + metadata) / combine_flat:7.1%}"
    )
    for link in ("inter_node", "intra_node"):
        a = flat["bytes_per_link_class"][link]  # type: ignore[index]
        b = migrated["bytes_per_link_class"][link]  # type: ignore[index]
        print(
            f"{link} bytes per step, all collectives: flat {a:14,.0f}  migration {b:14,.0f}  ({b / a:.3f}x)"
        )


if __name__ == "__main__":
    main()
