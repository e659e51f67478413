"""QLoRA and 8-bit clients, on a tiny Llama quantized by bitsandbytes on this CPU: the LoRA strategies that leave the
base untouched train on it, the merged model is the dequantized base plus the adapters (checked against that sum
computed here, and loadable without peft or bitsandbytes), a run resumes exactly, and every strategy that would
write into the quantized base is refused when the trainer is built."""

import subprocess
import sys

import bitsandbytes.functional as bnb_functional
import pytest
import torch
from conftest import fed_config
from datasets import Dataset
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from test_trl import COMMON, FORMATS, qa_data, tiny_llama, training_tokenizer
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

from fed_trainer import FederatedSFTConfig, FederatedSFTTrainer, FederatedTrainer
from fed_trainer.strategies.capabilities import registered

QUANTIZATIONS = {
    "4-bit nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
    "4-bit fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.float32),
    "8-bit": dict(load_in_8bit=True),
}
LORA = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"])
QUANTIZED_WEIGHTS = ("Params4bit", "Int8Params")  # bitsandbytes' parameter classes
IDS = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def llama_path(tmp_path_factory) -> str:
    """A randomly initialised 2-layer Llama (vocabulary 256, width 64) saved in float32."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        intermediate_size=128, max_position_embeddings=64, tie_word_embeddings=True,
    )  # fmt: skip
    path = str(tmp_path_factory.mktemp("llama"))
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def quantized(path: str, kind: str, **kwargs) -> LlamaForCausalLM:
    config = BitsAndBytesConfig(**QUANTIZATIONS[kind])
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=config, device_map="cpu", **kwargs)


def copy_task(n: int, seed: int) -> Dataset:
    """Sequences of 8 of the 256 tokens, each odd one repeating the one before it: learnable by the adapters."""
    ids = torch.randint(0, 8, (n, 16), generator=torch.Generator().manual_seed(seed))
    ids[:, 1::2] = ids[:, 0::2]
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})


def run(path: str, kind: str, strategy: str, tmp_path, rounds: int = 3, **overrides) -> FederatedTrainer:
    args = fed_config(
        tmp_path, num_clients=2, num_rounds=rounds, local_steps=5, learning_rate=2e-2, strategy=strategy, **overrides
    )
    return FederatedTrainer(
        model=quantized(path, kind), args=args, client_datasets=[copy_task(40, 0), copy_task(40, 1)],
        eval_dataset=copy_task(16, 2), peft_config=LORA,
    )  # fmt: skip


def dequantized(module: torch.nn.Module) -> torch.Tensor:
    """A bitsandbytes layer's weight in float32, from its packed data and scales."""
    weight = module.weight
    if type(weight).__name__ == QUANTIZED_WEIGHTS[0]:
        return bnb_functional.dequantize_4bit(weight.data, weight.quant_state).float()
    scales = weight.SCB if weight.SCB is not None else module.state.SCB  # moved to the state by a forward
    return weight.data.float() * scales.float().view(-1, 1) / 127  # LLM.int8: row-wise absmax scales


def reference_models(trainer: FederatedTrainer, path: str) -> tuple[LlamaForCausalLM, LlamaForCausalLM]:
    """(dequantized base, dequantized base + s B A): plain float32 models built here from the live quantized model."""
    live = trainer.model.get_base_model()
    base, merged = LlamaForCausalLM.from_pretrained(path), LlamaForCausalLM.from_pretrained(path)
    for name, module in live.named_modules():
        if isinstance(module, LoraLayer):
            weight = dequantized(module.get_base_layer())
            a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
            base.get_submodule(name).weight.data.copy_(weight)
            merged.get_submodule(name).weight.data.copy_(weight + module.scaling["default"] * b.detach() @ a.detach())
        elif "base_layer" not in name and type(getattr(module, "weight", None)).__name__ in QUANTIZED_WEIGHTS:
            for model in (base, merged):
                model.get_submodule(name).weight.data.copy_(dequantized(module))
    return base.eval(), merged.eval()


@torch.no_grad()
def logits(model: torch.nn.Module) -> torch.Tensor:
    return model(input_ids=IDS).logits


@pytest.mark.parametrize(
    ("kind", "strategy"), [("4-bit nf4", "fedit"), ("4-bit fp4", "ffa_lora"), ("8-bit", "rolora")]
)
def test_lora_on_a_quantized_base_trains_and_merges_into_the_dequantized_base(llama_path, kind, strategy, tmp_path):
    trainer = run(llama_path, kind, strategy, tmp_path)
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    assert trainer.evaluate()["eval_loss"] < before - 0.05

    merged = trainer.merged_model()
    assert type(merged) is LlamaForCausalLM and getattr(merged.config, "quantization_config", None) is None
    assert {p.dtype for p in merged.parameters()} == {torch.float32}
    assert not any(isinstance(m, LoraLayer) or "bitsandbytes" in type(m).__module__ for m in merged.modules())
    base, expected = reference_models(trainer, llama_path)
    for name, value in expected.state_dict().items():
        torch.testing.assert_close(merged.state_dict()[name], value, rtol=1e-6, atol=1e-6)

    live = trainer.model.eval()
    gap = (logits(merged) - logits(live)).abs().max().item()
    adapters = (logits(merged) - logits(base)).abs().max().item()
    if kind.startswith("4-bit"):  # the 4-bit layer computes with exactly the dequantized weight
        assert gap < 1e-5
    else:  # LLM.int8 also rounds the activations: the merged model is as close as the base's own dequantization
        with live.disable_adapter():
            int8_rounding = (logits(base) - logits(live)).abs().max().item()
        assert gap <= 2 * int8_rounding
    assert adapters > 10 * max(gap, 1e-5)  # what the clients trained is in the merged model


def test_saved_model_loads_without_peft_or_bitsandbytes_and_the_card_says_so(llama_path, tmp_path):
    trainer = run(llama_path, "4-bit nf4", "fedit", tmp_path, rounds=1)
    trainer.train()
    out = tmp_path / "saved"
    trainer.save_model(str(out))
    trainer.args.output_dir = str(out)
    trainer.create_model_card()
    assert "4-bit nf4 (bitsandbytes)" in (out / "README.md").read_text()
    torch.save(IDS, tmp_path / "ids.pt")
    code = (
        "import sys; sys.modules['peft'] = None; sys.modules['bitsandbytes'] = None\n"
        "import torch; from transformers import AutoModelForCausalLM\n"
        f"model = AutoModelForCausalLM.from_pretrained({str(out)!r})\n"
        f"torch.save(model(input_ids=torch.load({str(tmp_path / 'ids.pt')!r})).logits, {str(tmp_path / 'out.pt')!r})"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), logits(trainer.model.eval()), rtol=0, atol=1e-5)


def test_a_quantized_run_resumes_where_the_uninterrupted_run_ends(llama_path, tmp_path):
    whole = run(llama_path, "4-bit nf4", "fedit", tmp_path / "whole", save_every_rounds=1)
    whole.train()
    resumed = run(llama_path, "4-bit nf4", "fedit", tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "whole" / "out" / "round-2"))
    trained = {k: v for k, v in whole.model.state_dict().items() if "lora_" in k}
    assert trained
    for name, value in resumed.model.state_dict().items():
        if name in trained:
            torch.testing.assert_close(value, trained[name], rtol=0, atol=0)


@pytest.mark.parametrize("name", registered(built_in=True))
def test_strategies_that_would_write_into_or_read_a_quantized_base_are_refused(llama_path, name, tmp_path):
    caps = registered()[name].capabilities
    build = lambda: FederatedTrainer(  # noqa: E731
        model=quantized(llama_path, "4-bit nf4"), args=fed_config(tmp_path, num_clients=2, strategy=name),
        client_datasets=[copy_task(8, 0), copy_task(8, 1)], peft_config=LORA if caps.lora else None,
    )  # fmt: skip
    if caps.lora and not caps.folds_into_base and not caps.reads_base:
        build()
        return
    adapters_only = r"\['fedit', 'ffa_lora', 'fedsa_lora', 'lora_fair', 'rolora'\]"
    refused = rf"4-bit nf4 base cannot hold.*{adapters_only}.*quantization_config"
    with pytest.raises(ValueError, match=refused):
        build()


def test_the_quantized_base_is_prepared_as_peft_recommends(llama_path, tmp_path):
    trainer = FederatedTrainer(
        model=quantized(llama_path, "4-bit nf4", dtype=torch.bfloat16),
        args=fed_config(tmp_path, num_clients=2, strategy="fedit", gradient_checkpointing=True),
        client_datasets=[copy_task(8, 0), copy_task(8, 1)], peft_config=LORA,
    )  # fmt: skip
    model = trainer.model
    assert model.get_base_model().is_gradient_checkpointing
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    norms = [p for name, p in model.named_parameters() if "norm" in name]
    assert norms and all(p.dtype == torch.float32 for p in norms)  # bf16 when loaded; float32 for training


def test_qlora_sft_clients_learn_the_held_out_answers(tmp_path):
    """A 4-bit base under FederatedSFTTrainer (TRL's SFTTrainer as the client), on chatterbot conversations."""
    tokenizer = training_tokenizer()
    tiny_llama(tokenizer).save_pretrained(tmp_path / "llama")
    validation = qa_data("conversational", 100, 16)
    trainer = FederatedSFTTrainer(
        model=quantized(str(tmp_path / "llama"), "4-bit nf4"), processing_class=tokenizer,
        peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"),
        args=FederatedSFTConfig(output_dir=str(tmp_path / "out"), num_rounds=3, local_steps=4, strategy="fedit",
                                eval_strategy="epoch",
                                **{**COMMON, "learning_rate": 5e-2}, **FORMATS["conversational"]),
        client_datasets=[qa_data("conversational", 0, 16), qa_data("conversational", 16, 16)],
        eval_dataset=validation,
    )  # fmt: skip
    trainer.train()
    # TRL keeps the adapters of a quantized model in bfloat16 (QLoRA's recipe); the server's average stays float32
    assert {p.dtype for p in trainer.model.parameters() if p.requires_grad} == {torch.bfloat16}
    assert {t.dtype for t in trainer.strategy.global_state.values()} == {torch.float32}
    rounds = [entry for entry in trainer.state.log_history if "round" in entry]
    assert rounds[-1]["eval_loss"] < rounds[0]["eval_loss"] - 0.02
