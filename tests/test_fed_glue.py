"""examples/fed_glue.py end to end on the bundled MiniLM and BBC News, in a short configuration."""

import csv
import json
import random
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import fed_glue  # noqa: E402

from fed_trainer.assets import load_bbc_news, minilm_path  # noqa: E402

# Enough training for the topic to show, on 2 CPU cores in under a minute: 2 clients x 2 rounds x 4 steps of 16
# articles cut to 32 tokens, judged on the first 64 validation articles.
LEARNS = [
    "--num_clients", "2", "--num_rounds", "2", "--local_steps", "4", "--max_train_samples", "128",
    "--max_eval_samples", "64", "--max_seq_length", "32", "--per_device_train_batch_size", "16",
    "--warmup_steps", "0", "--disable_tqdm", "true", "--dataloader_pin_memory", "false",
]  # fmt: skip
EVAL_SAMPLES = 64
# How far above always answering the most frequent topic the federated model must be (measured: 0.73 for fedavg,
# 0.38 for fedit at its recipe's rate of 2e-3; the majority class holds 17 of these 64 articles, 0.27).
MARGIN = 0.1


def majority_fraction() -> float:
    """The share of the most frequent topic among the validation articles the tests evaluate on, read from the
    embedded data itself (the example splits BBC News with its default seed, 42)."""
    labels = load_bbc_news(seed=42)["validation"]["label"][:EVAL_SAMPLES]
    return max(Counter(labels).values()) / len(labels)


def assert_learned(metrics: dict) -> None:
    assert metrics["eval_samples"] == EVAL_SAMPLES
    assert metrics["eval_accuracy"] > majority_fraction() + MARGIN, metrics


def test_fed_glue_learns_on_the_embedded_default(tmp_path):
    metrics = fed_glue.main([*LEARNS, "--learning_rate", "1e-3", "--output_dir", str(tmp_path)])
    assert_learned(metrics)
    results = json.loads((tmp_path / "all_results.json").read_text())
    assert {"eval_accuracy", "eval_f1_macro", "train_loss", "total_bytes_up"} <= set(results)
    assert json.loads((tmp_path / "eval_results.json").read_text())["eval_accuracy"] == metrics["eval_accuracy"]
    model = AutoModelForSequenceClassification.from_pretrained(str(tmp_path))
    assert model.config.num_labels == 5 and model.config.model_type == "bert"


def sentence_pair_rows(n: int, seed: int) -> list[tuple[str, str, int]]:
    """Pairs whose label is the sentiment of the second sentence; the first is noise."""
    nouns = ["cat", "dog", "car", "bank", "river", "piano", "doctor", "garden", "train", "market", "storm", "bread"]
    good = ["wonderful", "excellent", "delightful", "great", "lovely", "superb"]
    bad = ["awful", "terrible", "horrible", "dreadful", "bad", "disgusting"]
    rng = random.Random(seed)
    return [
        (f"the {rng.choice(nouns)} was here", f"it was {rng.choice(good if i % 2 else bad)}", i % 2) for i in range(n)
    ]


def test_fed_glue_learns_from_csv_files_with_sentence_pairs(tmp_path):
    for name, n, seed in (("train", 128, 0), ("dev", 64, 1)):
        with open(tmp_path / f"{name}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["sentence1", "sentence2", "label"])
            writer.writerows(sentence_pair_rows(n, seed))
    metrics = fed_glue.main(
        [*LEARNS, "--learning_rate", "1e-3", "--output_dir", str(tmp_path / "out"),
         "--train_file", str(tmp_path / "train.csv"), "--validation_file", str(tmp_path / "dev.csv")]
    )  # fmt: skip
    assert metrics["eval_samples"] == 64
    assert metrics["eval_accuracy"] >= 0.9, metrics  # two balanced classes: chance is 0.5 (measured: 1.0)
    assert AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "out")).config.num_labels == 2


@pytest.mark.parametrize("form", ["positional", "flag"])
def test_recipes_load_and_command_line_flags_override_them(form):
    recipe = str(ROOT / "recipes" / "galore_fedavg.yaml")
    argv = [recipe, "--num_rounds", "2"] if form == "positional" else ["--config", recipe, "--num_rounds", "2"]
    _, _, args = fed_glue.parse_args(argv)
    assert args.optim == "galore_adamw" and args.optim_target_modules == ["attention", "intermediate", "output.dense"]
    assert args.num_rounds == 2 and args.num_clients == 4 and args.strategy == "fedavg"


def accuracy_of_saved_model(directory: Path) -> float:
    """The saved model's accuracy on the validation articles the example evaluates, computed here from its files."""
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    model = AutoModelForSequenceClassification.from_pretrained(str(directory)).eval()
    articles = load_bbc_news(seed=42)["validation"].select(range(EVAL_SAMPLES))
    batch = tokenizer(list(articles["text"]), truncation=True, max_length=32, padding=True, return_tensors="pt")
    with torch.no_grad():
        predictions = model(**batch).logits.argmax(-1)
    return float((predictions == torch.tensor(list(articles["label"]))).float().mean())


def lora_weights_moved_only_where_targeted(directory: Path, targets: list[str]) -> None:
    """The saved model is plain; LoRA changed only its targeted layers (and the new classifier): everything else
    is still the bundled MiniLM's."""
    saved = AutoModelForSequenceClassification.from_pretrained(str(directory)).state_dict()
    assert not any("lora" in name for name in saved)
    base = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=5).state_dict()
    for name, value in saved.items():
        if name.startswith("classifier"):
            continue
        targeted = name.endswith(".weight") and any(f"{t}.weight" in name for t in targets)
        assert torch.equal(value, base[name]) != targeted, name


def test_the_fedsa_lora_recipe_serves_each_client_with_its_own_b(tmp_path):
    """Each client's own model (shared A, its B) learns its topics; the shared model alone (B = 0) does not."""
    recipe = str(ROOT / "recipes" / "fedsa_lora.yaml")
    flags = ["--learning_rate", "1e-2", "--client_eval_split", "0.25", "--output_dir", str(tmp_path)]
    shared = fed_glue.main([recipe, *LEARNS, *flags])["eval_accuracy"]
    rounds = [e for e in json.loads((tmp_path / "trainer_state.json").read_text())["log_history"] if "round" in e]
    own = rounds[-1]["eval_clients_mean_accuracy"]
    assert own > majority_fraction() + MARGIN and own > shared + MARGIN, (own, shared)


# LoRA learns at a higher rate than the recipes' (tuned for 5 rounds of 10 steps): 1e-2 in this short run.
@pytest.mark.parametrize(
    "strategy", ["fedit", "ffa_lora", "rolora", "lora_fair", "fed_sb", "fedex_lora", "flora", "flexlora"]
)
def test_every_lora_recipe_runs_the_example(tmp_path, strategy):
    recipe = str(ROOT / "recipes" / f"{strategy}.yaml")
    ranks = ["--lora_ranks", "2", "4"] if strategy in ("flora", "flexlora") else []  # LEARNS has 2 clients
    metrics = fed_glue.main([recipe, *LEARNS, *ranks, "--learning_rate", "1e-2", "--output_dir", str(tmp_path)])
    assert_learned(metrics)
    results = json.loads((tmp_path / "all_results.json").read_text())
    assert results["total_bytes_up"] > 0
    lora_weights_moved_only_where_targeted(tmp_path, ["query", "key", "value", "dense"])


def test_the_fedadam_recipe_sets_the_server_optimizer():
    """Parsed only (CI time): its server step is tested in tests/test_server_optimizer.py, and a server-optimizer
    recipe learns in the next test (diloco)."""
    _, _, args = fed_glue.parse_args([str(ROOT / "recipes" / "fedadam.yaml")])
    assert (args.strategy, args.server_optimizer, args.server_learning_rate) == ("fedavg", "fedadam", 1e-3)
    assert args.server_betas == [0.9, 0.99] and args.server_epsilon == 1e-6


# AdamW clients at the short run's 1e-3 (as above); SCAFFOLD's SGD clients at its recipe's own rate
@pytest.mark.parametrize(
    ("recipe", "flags", "expected"),
    [
        ("diloco", ["--learning_rate", "1e-3"], dict(strategy="fedavg", server_optimizer="nesterov")),
        ("scaffold", [], dict(strategy="scaffold", optim="sgd")),
    ],
)
def test_the_server_optimizer_and_drift_recipes_learn(tmp_path, recipe, flags, expected):
    path = str(ROOT / "recipes" / f"{recipe}.yaml")
    metrics = fed_glue.main([path, *LEARNS, *flags, "--output_dir", str(tmp_path)])
    assert_learned(metrics)
    saved = torch.load(tmp_path / "training_args.bin", weights_only=False)
    assert {key: str(getattr(saved.optim, "value", saved.optim)) if key == "optim" else getattr(saved, key)
            for key in expected} == expected  # fmt: skip


def test_the_galore_lowrank_recipe_learns_and_sends_less_than_fedavg(tmp_path):
    recipe = str(ROOT / "recipes" / "galore_lowrank.yaml")
    metrics = fed_glue.main([recipe, *LEARNS, "--learning_rate", "1e-3", "--output_dir", str(tmp_path)])
    assert_learned(metrics)
    results = json.loads((tmp_path / "all_results.json").read_text())
    assert results["total_bytes_up"] < results["total_bytes_down"]  # dense down, (c, P, R) up


def saved_weights(directory: Path) -> dict:
    return AutoModelForSequenceClassification.from_pretrained(str(directory)).state_dict()


def test_the_same_seed_gives_the_same_model_and_another_seed_another(tmp_path):
    quick = ["--num_clients", "2", "--num_rounds", "1", "--local_steps", "2", "--max_train_samples", "32",
             "--max_eval_samples", "8", "--max_seq_length", "32", "--per_device_train_batch_size", "8",
             "--partition", "dirichlet", "--disable_tqdm", "true"]  # fmt: skip
    for run, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        fed_glue.main([*quick, "--seed", seed, "--output_dir", str(tmp_path / run)])
    a, b, c = (saved_weights(tmp_path / run) for run in "abc")
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert not torch.equal(a["classifier.weight"], c["classifier.weight"])  # the new head is drawn from the seed
    assert not torch.equal(a["bert.encoder.layer.0.attention.self.query.weight"],
                           c["bert.encoder.layer.0.attention.self.query.weight"])  # fmt: skip
