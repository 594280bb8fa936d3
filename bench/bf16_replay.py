"""Replays the first steps of a finished fine-tune here and puts them beside its recorded train_log.jsonl: do bf16
emulated (a CPU without AVX-512 BF16, precision.EmulatedBf16Kernels) and fp32 follow what the recorded run did?

    python bench/bf16_replay.py runs/real_smollm2_1m/train/manyicl [--steps 8] [--precisions bf16 fp32]

The fine-tune's own config.yaml, trained again into a temporary folder for ``--steps`` steps (the same sequences
in the same order, the same initial LoRA weights, the same learning rate schedule) in each precision; per step
the loss and grad norm beside the recorded ones. On a CPU without AVX-512 BF16, bf16 is the emulation; on one
with it, torch's own kernels. Last line: RESULT steps=<n> recorded=<precision> then, per precision,
<p>_loss_rel=<mean |loss - recorded| / recorded> <p>_grad_norm_rel=<same for the grad norm>.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from transformers import TrainerCallback

from manyicl.config import load_config
from manyicl.files import read_log
from manyicl.precision import bf16_kernels
from manyicl.train import train


class StopAfter(TrainerCallback):
    def __init__(self, steps: int):
        self.steps = steps

    def on_step_end(self, args, state, control, **kwargs):
        control.should_training_stop = state.global_step >= self.steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("finetune", type=Path, help="a finished fine-tune's folder (config.yaml, train_log.jsonl)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--precisions", nargs="+", default=["bf16", "fp32"])
    args = parser.parse_args()
    recorded = read_log(args.finetune / "train_log.jsonl")[:args.steps]
    recorded_precision = json.loads((args.finetune / "train_summary.json").read_text())["precision"]
    result = f"RESULT steps={args.steps} recorded={recorded_precision}"
    for precision in args.precisions:
        config = load_config(args.finetune / "config.yaml")
        with tempfile.TemporaryDirectory() as tmp:
            config = config.model_copy(update={
                "output_dir": str(Path(tmp) / "replay"),
                "training": config.training.model_copy(update={"precision": precision}),
            })
            train(config, callbacks=[StopAfter(args.steps)])
            replayed = read_log(Path(tmp) / "replay" / "train_log.jsonl")
        label = f"{precision} ({bf16_kernels(precision)})" if precision == "bf16" else precision
        print(f"\n{label} against the record ({recorded_precision}):")
        print("step  tasks                         loss recorded   replayed   grad norm recorded   replayed")
        loss_rel, norm_rel = [], []
        for old, new in zip(recorded, replayed):
            assert old["step"] == new["step"] and old["tasks"] == new["tasks"], (old, new)  # the same sequences
            loss_rel.append(abs(new["loss"] - old["loss"]) / abs(old["loss"]))
            norm_rel.append(abs(new["grad_norm"] - old["grad_norm"]) / abs(old["grad_norm"]))
            print(f"{old['step']:>4}  {','.join(old['tasks'])[:28]:<28} {old['loss']:>14.5f} {new['loss']:>10.5f} "
                  f"{old['grad_norm']:>19.5f} {new['grad_norm']:>10.5f}")
        result += (f" {precision}_loss_rel={sum(loss_rel) / len(loss_rel):.5f}"
                   f" {precision}_grad_norm_rel={sum(norm_rel) / len(norm_rel):.5f}")
    print(result)


if __name__ == "__main__":
    main()
