"""examples/fed_glue.py end to end on the bundled MiniLM and BBC News, in a short configuration."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import fed_glue  # noqa: E402

SHORT = [
    "--num_clients", "2", "--num_rounds", "2", "--local_steps", "2", "--max_train_samples", "64",
    "--max_eval_samples", "32", "--max_seq_length", "32", "--per_device_train_batch_size", "8",
    "--disable_tqdm", "true", "--dataloader_pin_memory", "false",
]  # fmt: skip


def test_fed_glue_runs_on_the_embedded_default(tmp_path):
    metrics = fed_glue.main([*SHORT, "--output_dir", str(tmp_path)])
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0 and metrics["eval_samples"] == 32
    results = json.loads((tmp_path / "all_results.json").read_text())
    assert {"eval_accuracy", "eval_f1_macro", "train_loss", "total_bytes_up"} <= set(results)
    assert json.loads((tmp_path / "eval_results.json").read_text())["eval_accuracy"] == metrics["eval_accuracy"]
    model = AutoModelForSequenceClassification.from_pretrained(str(tmp_path))
    assert model.config.num_labels == 5 and model.config.model_type == "bert"


def test_fed_glue_reads_csv_files_with_sentence_pairs(tmp_path):
    import csv

    rows = [("the cat sat", "a cat was sitting", 1), ("stocks fell", "the sun is hot", 0)] * 16
    for name in ("train", "dev"):
        with open(tmp_path / f"{name}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["sentence1", "sentence2", "label"])
            writer.writerows(rows)
    metrics = fed_glue.main(
        [*SHORT, "--output_dir", str(tmp_path / "out"), "--train_file", str(tmp_path / "train.csv"),
         "--validation_file", str(tmp_path / "dev.csv")]
    )  # fmt: skip
    assert metrics["eval_samples"] == 32


@pytest.mark.parametrize("form", ["positional", "flag"])
def test_recipes_load_and_command_line_flags_override_them(form):
    recipe = str(ROOT / "recipes" / "galore_fedavg.yaml")
    argv = [recipe, "--num_rounds", "2"] if form == "positional" else ["--config", recipe, "--num_rounds", "2"]
    _, _, args = fed_glue.parse_args(argv)
    assert args.optim == "galore_adamw" and args.optim_target_modules == ["attention", "intermediate", "output.dense"]
    assert args.num_rounds == 2 and args.num_clients == 4 and args.strategy == "fedavg"


def test_accelerate_launch_runs_the_example(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="2")
    launcher = Path(sys.executable).with_name("accelerate")
    result = subprocess.run(
        [str(launcher), "launch", "--num_processes", "1", "--cpu", str(ROOT / "examples" / "fed_glue.py"),
         *SHORT, "--output_dir", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "eval_accuracy" in json.loads((tmp_path / "all_results.json").read_text())
    assert torch.load(tmp_path / "training_args.bin", weights_only=False).num_rounds == 2


@pytest.mark.parametrize("strategy", ["fedit", "ffa_lora", "fedex_lora", "flora", "flexlora"])
def test_every_lora_recipe_runs_the_example(tmp_path, strategy):
    recipe = str(ROOT / "recipes" / f"{strategy}.yaml")
    ranks = ["--lora_ranks", "2", "4"] if strategy in ("flora", "flexlora") else []  # SHORT has 2 clients
    metrics = fed_glue.main([recipe, *SHORT, *ranks, "--output_dir", str(tmp_path)])
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0
    results = json.loads((tmp_path / "all_results.json").read_text())
    assert results["total_bytes_up"] > 0
    model = AutoModelForSequenceClassification.from_pretrained(str(tmp_path))
    assert not any("lora" in name for name in model.state_dict())


def test_the_galore_lowrank_recipe_runs_the_example_and_sends_less_than_fedavg(tmp_path):
    recipe = str(ROOT / "recipes" / "galore_lowrank.yaml")
    metrics = fed_glue.main([recipe, *SHORT, "--output_dir", str(tmp_path)])
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0
    results = json.loads((tmp_path / "all_results.json").read_text())
    assert results["total_bytes_up"] < results["total_bytes_down"]  # dense down, (c, P, R) up
