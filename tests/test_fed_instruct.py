"""examples/fed_instruct.py on the bundled SmolLM2-135M-Instruct and chatterbot-corpus, in a short configuration."""

import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, LlamaConfig, LlamaForCausalLM
from trl import SFTConfig, SFTTrainer

from fed_trainer.assets import SMOLLM2_TRAINING_CHAT_TEMPLATE, load_chatterbot_qa, smollm2_path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "bench"))

import fed_instruct  # noqa: E402
from chat import IGNORE_INDEX, chat_example_tokenizer, has_answer_tokens  # noqa: E402

SHORT = [
    "--clients_per_round", "2", "--local_steps", "2", "--max_eval_samples", "8", "--max_length", "64",
    "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "8", "--warmup_steps", "0",
    "--disable_tqdm", "true",
]  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(smollm2_path())


def test_chatterbot_pairs_are_split_within_every_topic():
    data = load_chatterbot_qa(validation_fraction=0.1, seed=0)
    assert len(data["train"]) + len(data["validation"]) == 2393
    assert set(data["train"]["topic"]) == set(data["validation"]["topic"]) and len(set(data["train"]["topic"])) == 21


def test_chat_examples_put_the_loss_on_the_answer_only(tokenizer):
    example = chat_example_tokenizer(tokenizer, 256)({"question": "What is AI?", "answer": "A field of study."})
    conversation = [{"role": "user", "content": "What is AI?"}, {"role": "assistant", "content": "A field of study."}]
    templated = tokenizer.apply_chat_template(conversation, tokenize=False)
    assert example["input_ids"] == tokenizer(templated, add_special_tokens=False)["input_ids"]
    answer = [t for t, label in zip(example["input_ids"], example["labels"]) if label != IGNORE_INDEX]
    assert tokenizer.decode(answer) == "A field of study.<|im_end|>\n"
    assert example["labels"][: -len(answer)] == [IGNORE_INDEX] * (len(example["input_ids"]) - len(answer))
    cut = chat_example_tokenizer(tokenizer, 8)({"question": "What is AI?", "answer": "A field of study."})
    assert len(cut["input_ids"]) == 8 and not has_answer_tokens(cut)


def test_the_training_chat_template_renders_smollm2s_text(tokenizer):
    system = [{"role": "system", "content": "Be brief."}]
    turns = [
        {"role": "user", "content": "Hi?"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "What is AI?"},
        {"role": "assistant", "content": "A field of study."},
    ]
    for messages in (turns, system + turns, turns[:1], turns[:3]):
        for generation_prompt in (False, True):
            expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
            rendered = tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=generation_prompt,
                chat_template=SMOLLM2_TRAINING_CHAT_TEMPLATE,
            )  # fmt: skip
            assert rendered == expected
    marked = tokenizer.apply_chat_template(
        turns, chat_template=SMOLLM2_TRAINING_CHAT_TEMPLATE, return_dict=True, return_assistant_tokens_mask=True
    )
    replies = [t for t, mask in zip(marked["input_ids"], marked["assistant_masks"]) if mask]
    assert tokenizer.decode(replies) == "Hello.<|im_end|>\nA field of study.<|im_end|>\n"


def test_the_benchmarks_formatting_gives_the_tokens_and_labels_trl_gives(tokenizer, tmp_path):
    """bench/compare.py's instruct task formats pairs with bench/chat.py; the example uses TRL's SFT preparation.
    Both must train on the same tokens with the same labels."""
    pairs = load_chatterbot_qa(seed=42)["train"].select(range(200))
    ours = pairs.map(chat_example_tokenizer(tokenizer, 64), remove_columns=pairs.column_names)
    conversations = pairs.map(fed_instruct.conversation, remove_columns=pairs.column_names)
    trl_tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    trl_tokenizer.chat_template = SMOLLM2_TRAINING_CHAT_TEMPLATE
    tiny = LlamaForCausalLM(LlamaConfig(vocab_size=len(trl_tokenizer), hidden_size=8, num_hidden_layers=1,
                                        num_attention_heads=1, intermediate_size=8))  # fmt: skip
    args = SFTConfig(output_dir=str(tmp_path), max_length=64, assistant_only_loss=True, bf16=False, use_cpu=True,
                     report_to="none", gradient_checkpointing=False)  # fmt: skip
    theirs = SFTTrainer(model=tiny, args=args, train_dataset=conversations, processing_class=trl_tokenizer)
    kept = ours.filter(has_answer_tokens)  # TRL drops the pairs truncation left without an answer token, too
    assert len(kept) == len(theirs.train_dataset) > 190
    for a, b in zip(kept, theirs.train_dataset):
        assert (a["input_ids"], a["labels"]) == (b["input_ids"], b["labels"])


def validation_loss(model_path, tokenizer) -> float:
    data = load_chatterbot_qa(seed=42)["validation"].select(range(8))
    data = data.map(chat_example_tokenizer(tokenizer, 64), remove_columns=data.column_names)
    batch = DataCollatorForSeq2Seq(tokenizer, padding=True)(list(data))
    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(model_path)(**batch).loss.item()


def test_fed_instruct_full_weights_lower_the_validation_loss(tmp_path, tokenizer):
    metrics = fed_instruct.main(
        [*SHORT, "--num_rounds", "2", "--learning_rate", "5e-5", "--output_dir", str(tmp_path)]
    )
    results = json.loads((tmp_path / "all_results.json").read_text())
    assert results["eval_samples"] == 8 and results["perplexity"] == pytest.approx(2.718281828 ** metrics["eval_loss"])
    # the saved global model is a plain Llama that loads without fed_trainer, and it learned something
    before, after = validation_loss(smollm2_path(), tokenizer), validation_loss(str(tmp_path), tokenizer)
    assert after < before - 0.05, (before, after)


def test_fed_instruct_runs_a_lora_strategy_with_natural_clients(tmp_path):
    fed_instruct.main([*SHORT, "--num_rounds", "1", "--strategy", "fedex_lora", "--learning_rate", "5e-4",
                       "--output_dir", str(tmp_path)])  # fmt: skip
    state = json.loads((tmp_path / "trainer_state.json").read_text())
    round_log = next(e for e in state["log_history"] if "round" in e)
    assert round_log["num_clients"] == 2 and 0 < round_log["bytes_up"] < 2 * 4 * 135e6 / 10
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config
