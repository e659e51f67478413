"""`make run-short`: the README's main job in short, as `.ci/run` runs it, and its checks.

`accelerate launch examples/fed_glue.py` (one process on the CPU) with the short configuration of
tests/test_fed_glue.py (2 clients x 2 rounds x 4 steps of 16 articles at 32 tokens, judged on 64 validation
articles); then: the accuracy it reports is above always answering the most frequent topic by the tests' margin,
the model it saved is the model it reported on (its accuracy recomputed from the saved files), and the saved
training arguments are the run's.

    python tests/short_run.py OUTPUT_DIR
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from test_fed_glue import LEARNS, ROOT, accuracy_of_saved_model, assert_learned


def main(output_dir: str) -> None:
    out = Path(output_dir)
    launcher = Path(sys.executable).with_name("accelerate")
    command = [str(launcher), "launch", "--num_processes", "1", "--cpu", str(ROOT / "examples" / "fed_glue.py"),
               *LEARNS, "--learning_rate", "1e-3", "--output_dir", str(out)]  # fmt: skip
    print(" ".join(command), flush=True)
    subprocess.run(command, check=True, env=dict(os.environ, OMP_NUM_THREADS="2"), timeout=600)
    metrics = json.loads((out / "eval_results.json").read_text())
    assert_learned(metrics)
    saved = accuracy_of_saved_model(out)
    assert abs(saved - metrics["eval_accuracy"]) < 1e-6, (saved, metrics["eval_accuracy"])
    assert torch.load(out / "training_args.bin", weights_only=False).num_rounds == 2
    print(f"make run-short: eval_accuracy {metrics['eval_accuracy']:.3f}, the saved model's the same")


if __name__ == "__main__":
    main(sys.argv[1])
