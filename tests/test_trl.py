"""TRL's trainers as federated clients, on a tiny random Llama with the bundled SmolLM2 tokenizer and chatterbot-corpus
Q/A pairs (and preference pairs built from them): a federated run of one client and one round is TRL's own run, every
strategy trains under SFT as it declares, each dataset is prepared once, the global model is evaluated as TRL does,
DPO's reference is the round's global model, and the package imports without TRL."""

import copy
import math
import subprocess
import sys

import pytest
import torch
from peft import LoraConfig
from recording import Record, aggregation_gaps
from supernodes import SuperNodesInProcess
from transformers import AutoTokenizer, HfArgumentParser, LlamaConfig, LlamaForCausalLM
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

from fed_trainer import FederatedDPOConfig, FederatedDPOTrainer, FederatedSFTConfig, FederatedSFTTrainer
from fed_trainer.assets import (
    SMOLLM2_TRAINING_CHAT_TEMPLATE,
    chatterbot_preference_pairs,
    load_chatterbot_qa,
    smollm2_path,
)
from fed_trainer.strategies.capabilities import registered
from fed_trainer.strategies.registry import strategy_class

COMMON = dict(
    per_device_train_batch_size=4, learning_rate=1e-3, seed=7, report_to="none", use_cpu=True, bf16=False,
    disable_tqdm=True, max_length=64, gradient_checkpointing=False, dataloader_pin_memory=False, save_strategy="no",
)  # fmt: skip
# each data format with the loss TRL puts on it
FORMATS = {
    "prompt_completion": dict(completion_only_loss=True),
    "conversational": dict(assistant_only_loss=True),
}


def training_tokenizer():
    """The bundled SmolLM2 tokenizer with TRL's generation markers in its chat template."""
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    tokenizer.chat_template = SMOLLM2_TRAINING_CHAT_TEMPLATE
    return tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return training_tokenizer()


def tiny_llama(tokenizer, seed: int = 0) -> LlamaForCausalLM:
    """A randomly initialised 2-layer Llama over SmolLM2's vocabulary (about 1.6M parameters, most in embeddings)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        intermediate_size=64, max_position_embeddings=128, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def qa_data(kind: str, start: int, n: int):
    """`n` chatterbot Q/A pairs from position `start`, as TRL's prompt-completion or conversational examples."""
    pairs = load_chatterbot_qa(seed=0)["train"].select(range(start, start + n))
    if kind == "prompt_completion":
        convert = lambda e: {"prompt": f"Question: {e['question']}\nAnswer:", "completion": f" {e['answer']}"}  # noqa: E731
    else:
        convert = lambda e: {  # noqa: E731
            "messages": [{"role": "user", "content": e["question"]}, {"role": "assistant", "content": e["answer"]}]
        }
    return pairs.map(convert, remove_columns=pairs.column_names)


@pytest.mark.parametrize("kind", FORMATS)
def test_one_client_one_round_is_trls_own_run(tokenizer, kind, tmp_path):
    data, steps = qa_data(kind, 0, 40), 4
    plain = tiny_llama(tokenizer)
    SFTTrainer(
        model=plain, args=SFTConfig(output_dir=str(tmp_path / "plain"), max_steps=steps, **COMMON, **FORMATS[kind]),
        train_dataset=data, processing_class=tokenizer,
    ).train()  # fmt: skip
    fed = FederatedSFTTrainer(
        model=tiny_llama(tokenizer),
        args=FederatedSFTConfig(output_dir=str(tmp_path / "fed"), num_clients=1, num_rounds=1, local_steps=steps,
                                **COMMON, **FORMATS[kind]),
        client_datasets=[data], processing_class=tokenizer,
    )  # fmt: skip
    # TRL put the loss on the answer only: the labelled tokens of the first example are its answer (and end of turn)
    example = fed.client_datasets[0][0]
    answered = tokenizer.decode([t for t, label in zip(example["input_ids"], example["labels"]) if label != -100])
    answer = data[0]["completion"] if kind == "prompt_completion" else data[0]["messages"][1]["content"]
    end = tokenizer.eos_token if kind == "prompt_completion" else "<|im_end|>\n"
    assert answered == answer + end
    fed.train()
    trained = fed.merged_model().state_dict()
    for name, value in plain.state_dict().items():
        torch.testing.assert_close(trained[name], value, rtol=1e-5, atol=1e-6)


LORA = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
GALORE = dict(optim="galore_adamw", optim_target_modules=["self_attn", "mlp"],
              optim_args="rank=4,update_proj_gap=2,scale=0.25")  # fmt: skip


@pytest.mark.parametrize("name", registered(built_in=True))
def test_every_strategy_trains_sft_clients_as_it_declares(tokenizer, name, tmp_path):
    caps, record = strategy_class(name).capabilities, Record()
    trainer = FederatedSFTTrainer(
        model=tiny_llama(tokenizer),
        args=FederatedSFTConfig(
            output_dir=str(tmp_path), num_rounds=1, local_steps=2, strategy=name,
            **{**COMMON, "learning_rate": 2e-2 if caps.lora else 1e-3}, **(GALORE if caps.local_optimizer else {}),
            **FORMATS["conversational"],
        ),
        client_datasets=[qa_data("conversational", 0, 8), qa_data("conversational", 8, 12)],
        processing_class=tokenizer, callbacks=[record],
        peft_config=LORA if caps.lora else None, client_peft_configs=[2, 4] if caps.heterogeneous_ranks else None,
    )  # fmt: skip
    trainer.train()
    gaps = aggregation_gaps(record.rounds[0])
    if caps.exact:
        assert max(gaps.values()) < 1e-5, gaps
    else:  # an inexact rule misses sum_k p_k W_k on the LoRA-targeted layers
        assert max(gap for key, gap in gaps.items() if "q_proj" in key or "v_proj" in key) > 1e-5, gaps


def test_datasets_are_prepared_once_and_the_global_model_is_evaluated_as_trl_does(tokenizer, tmp_path, monkeypatch):
    calls = []
    prepare = SFTTrainer._prepare_dataset

    def counted(self, dataset, *args, **kwargs):
        calls.append(len(dataset))
        return prepare(self, dataset, *args, **kwargs)

    monkeypatch.setattr(SFTTrainer, "_prepare_dataset", counted)
    args = FederatedSFTConfig(
        output_dir=str(tmp_path),
        num_rounds=3,
        local_steps=2,
        eval_strategy="epoch",
        **COMMON,
        **FORMATS["conversational"],
    )
    validation = qa_data("conversational", 100, 16)
    trainer = FederatedSFTTrainer(
        model=tiny_llama(tokenizer), args=args, processing_class=tokenizer, eval_dataset=validation,
        client_datasets=[qa_data("conversational", 0, 8), qa_data("conversational", 8, 12)],
    )  # fmt: skip
    trainer.train()
    assert sorted(calls) == [8, 12, 16]  # each client and the evaluation set, once, though 3 rounds ran
    rounds = [entry for entry in trainer.state.log_history if "round" in entry]
    monkeypatch.setattr(SFTTrainer, "_prepare_dataset", prepare)
    reference = SFTTrainer(
        model=trainer.merged_model(), args=SFTConfig(output_dir=str(tmp_path / "ref"), **COMMON,
                                                     **FORMATS["conversational"]),
        train_dataset=validation, eval_dataset=validation, processing_class=tokenizer,
    ).evaluate()  # fmt: skip
    assert rounds[-1]["eval_loss"] == pytest.approx(reference["eval_loss"], rel=1e-5)
    assert rounds[-1]["eval_loss"] < rounds[0]["eval_loss"]  # the held-out answers got likelier


def test_sft_clients_on_supernodes_end_with_the_simulations_global_model(tokenizer, tmp_path):
    clients = [qa_data("conversational", 0, 8), qa_data("conversational", 8, 12)]

    def build(context, client_datasets):
        return FederatedSFTTrainer(
            model=tiny_llama(tokenizer), processing_class=tokenizer, peft_config=LORA, client_datasets=client_datasets,
            args=FederatedSFTConfig(output_dir=str(tmp_path / "out"), num_rounds=1, local_steps=2, strategy="fedit",
                                    **{**COMMON, "learning_rate": 2e-2}, **FORMATS["conversational"]),
        )  # fmt: skip

    simulated = build(None, clients)
    simulated.train()
    served = build(None, clients)
    served.client_executor = SuperNodesInProcess(build, clients, tmp_path / "nodes")
    served.train()
    expected = simulated.merged_model().state_dict()
    for name, value in served.merged_model().state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=1e-5, atol=1e-6, msg=name)
    losses = [[e["loss"] for e in t.state.log_history if "round" in e] for t in (served, simulated)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def preference_pairs(start: int, n: int):
    """`n` DPO pairs (question, its answer, another topic's answer) from position `start`."""
    pairs = chatterbot_preference_pairs(load_chatterbot_qa(seed=0)["train"], seed=1)
    return pairs.select(range(start, start + n)).remove_columns("topic")


TWO_CLIENTS = [(0, 8), (8, 8)]


DPO = dict(COMMON, beta=0.1)


def test_dpo_one_client_one_round_is_trls_own_run(tokenizer, tmp_path):
    data, steps = preference_pairs(0, 24), 3
    plain = tiny_llama(tokenizer)
    DPOTrainer(
        model=plain, ref_model=copy.deepcopy(plain), train_dataset=data, processing_class=tokenizer,
        args=DPOConfig(output_dir=str(tmp_path / "plain"), max_steps=steps, **DPO),
    ).train()  # fmt: skip
    fed = FederatedDPOTrainer(
        model=tiny_llama(tokenizer), client_datasets=[data], processing_class=tokenizer,
        args=FederatedDPOConfig(output_dir=str(tmp_path / "fed"), num_clients=1, num_rounds=1, local_steps=steps,
                                **DPO),
    )  # fmt: skip
    fed.train()
    trained = fed.merged_model().state_dict()
    for name, value in plain.state_dict().items():
        torch.testing.assert_close(trained[name], value, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["fedavg", "fedit", "flora"])
def test_dpo_trains_every_client_against_the_rounds_global_model(tokenizer, name, tmp_path):
    """With one local step, each client's loss is DPO's at its starting point: ln 2 exactly when the reference is
    the model the client starts from, in every round (a reference kept at the initial model would not give it once
    round 1 moved the global model)."""
    lora = strategy_class(name).capabilities.lora
    record = Record()
    trainer = FederatedDPOTrainer(
        model=tiny_llama(tokenizer), processing_class=tokenizer, callbacks=[record],
        client_datasets=[preference_pairs(*client) for client in TWO_CLIENTS],
        peft_config=LORA if lora else None,
        args=FederatedDPOConfig(output_dir=str(tmp_path), num_rounds=3, local_steps=1, strategy=name,
                                **{**DPO, "learning_rate": 5e-2 if lora else 1e-2}),
    )  # fmt: skip
    trainer.train()
    rounds = [entry for entry in trainer.state.log_history if "round" in entry]
    assert [entry["loss"] for entry in rounds] == pytest.approx([math.log(2)] * 3, abs=1e-6)
    moved = [max((r["start"][k] - record.rounds[0]["start"][k]).abs().max().item() for k in r["start"])
             for r in record.rounds[1:]]  # fmt: skip
    assert min(moved) > 1e-4, moved  # the reference really changed between rounds


def test_dpo_evaluates_the_global_model_against_the_last_rounds_start(tokenizer, tmp_path):
    record, validation = Record(), preference_pairs(200, 12)
    trainer = FederatedDPOTrainer(
        model=tiny_llama(tokenizer), processing_class=tokenizer, callbacks=[record], eval_dataset=validation,
        client_datasets=[preference_pairs(*client) for client in TWO_CLIENTS],
        args=FederatedDPOConfig(output_dir=str(tmp_path), num_rounds=2, local_steps=2, eval_strategy="epoch",
                                **{**DPO, "learning_rate": 1e-2}),
    )  # fmt: skip
    trainer.train()
    last = [entry for entry in trainer.state.log_history if "round" in entry][-1]
    policy, reference = tiny_llama(tokenizer), tiny_llama(tokenizer)
    policy.load_state_dict({k: v.float() for k, v in record.rounds[-1]["global"].items()})
    reference.load_state_dict({k: v.float() for k, v in record.rounds[-1]["start"].items()})
    expected = DPOTrainer(
        model=policy, ref_model=reference, train_dataset=validation, eval_dataset=validation,
        processing_class=tokenizer, args=DPOConfig(output_dir=str(tmp_path / "ref"), **DPO),
    ).evaluate()  # fmt: skip
    for key in ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins"):
        assert last[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-7), key


def test_dpo_refuses_a_reference_that_cannot_follow_the_rounds(tmp_path):
    for option in ("precompute_ref_log_probs", "sync_ref_model"):
        with pytest.raises(ValueError, match=f"{option}=False"):
            FederatedDPOConfig(output_dir=str(tmp_path), use_cpu=True, **{option: True})


def test_the_config_keeps_trls_defaults_and_parses_from_the_command_line(tmp_path):
    (args,) = HfArgumentParser(FederatedSFTConfig).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--assistant_only_loss", "true", "--strategy", "fedit", "--num_rounds", "3",
         "--packing", "true", "--use_cpu", "true"]
    )  # fmt: skip
    assert (args.learning_rate, args.gradient_checkpointing, args.max_length) == (2e-5, True, 1024)  # TRL's
    assert (args.strategy, args.num_rounds, args.assistant_only_loss, args.packing) == ("fedit", 3, True, True)
    with pytest.raises(ValueError, match="clients_per_round"):
        FederatedSFTConfig(output_dir=str(tmp_path), num_clients=2, clients_per_round=3, use_cpu=True)
    with pytest.raises(TypeError, match="FederatedSFTConfig"):
        FederatedSFTTrainer(model=torch.nn.Linear(2, 2), args=SFTConfig(output_dir=str(tmp_path), use_cpu=True))


def test_the_package_imports_without_trl():
    code = (
        "import sys; sys.modules['trl'] = None\n"
        "import fed_trainer\n"
        "fed_trainer.FederatedTrainer\n"
        "try:\n    fed_trainer.FederatedSFTTrainer\nexcept ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "pip install 'fed-trainer[trl]'" in out
