"""examples/fed_dpo.py on the bundled SmolLM2-135M-Instruct and preference pairs built from chatterbot-corpus, in a
short configuration; and the pairs themselves."""

import json
import sys
from pathlib import Path

from transformers import AutoModelForCausalLM

from fed_trainer.assets import chatterbot_preference_pairs, load_chatterbot_qa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import fed_dpo  # noqa: E402


def test_preference_pairs_reject_an_answer_from_another_topic():
    qa = load_chatterbot_qa(seed=0)["train"]
    pairs = chatterbot_preference_pairs(qa, seed=3)
    topic_of = {}
    for answer, topic in zip(qa["answer"], qa["topic"]):
        topic_of.setdefault(answer, set()).add(topic)
    assert len(pairs) == len(qa)
    for pair, question, answer in zip(pairs, qa["question"], qa["answer"]):
        assert pair["prompt"] == [{"role": "user", "content": question}]
        assert pair["chosen"] == [{"role": "assistant", "content": answer}]
        assert topic_of[pair["rejected"][0]["content"]] - {pair["topic"]}  # drawn from another topic's pairs
    assert chatterbot_preference_pairs(qa, seed=3)["rejected"] == pairs["rejected"]  # seeded


def test_fed_dpo_moves_the_preference_margin_against_the_initial_model(tmp_path):
    metrics = fed_dpo.main(
        ["--num_rounds", "1", "--clients_per_round", "2", "--local_steps", "2", "--per_device_train_batch_size", "4",
         "--max_length", "48", "--max_eval_samples", "8", "--eval_every_rounds", "0", "--learning_rate", "5e-6",
         "--output_dir", str(tmp_path), "--disable_tqdm", "true"]
    )  # fmt: skip
    # the chosen answers of held-out pairs gained likelihood over the rejected ones, against the initial model
    assert metrics["eval_vs_initial_rewards/margins"] > 0.01, metrics
    assert metrics["eval_vs_initial_loss"] < 0.69, metrics  # ln 2 = 0.693 is DPO's loss at the reference
    saved = json.loads((tmp_path / "eval_vs_initial_results.json").read_text())
    assert saved["eval_vs_initial_rewards/accuracies"] == metrics["eval_vs_initial_rewards/accuracies"]
    assert type(AutoModelForCausalLM.from_pretrained(tmp_path)).__name__ == "LlamaForCausalLM"  # a plain model
