"""Instruction-tuning examples in a model's chat template, with the loss on the answer only: how bench/compare.py's
instruct task formats chatterbot pairs (the examples use TRL's preparation, which gives the same tokens and labels)."""

from __future__ import annotations

from collections.abc import Callable

IGNORE_INDEX = -100  # labels the loss skips (transformers' convention)


def chat_example_tokenizer(
    tokenizer, max_length: int, question_column: str = "question", answer_column: str = "answer"
) -> Callable[[dict], dict]:
    """A function for `Dataset.map` (not batched) that turns one question/answer pair into `input_ids`,
    `attention_mask` and `labels`.

    The prompt is the chat template up to the assistant's turn (`add_generation_prompt=True`); the answer is the
    rest of the templated conversation (the reply and its end-of-turn tokens). The two parts are tokenized apart
    and joined, so the boundary is exact, and the prompt's labels are `IGNORE_INDEX`: the loss is on the answer.
    Sequences are cut to `max_length`; an example whose answer is cut away entirely gets no label (filter those
    with `has_answer_tokens`).
    """
    if tokenizer.chat_template is None:
        raise ValueError("The tokenizer has no chat template: use an instruct model or set tokenizer.chat_template.")

    def tokenize(example: dict) -> dict:
        question = [{"role": "user", "content": example[question_column]}]
        conversation = [*question, {"role": "assistant", "content": example[answer_column]}]
        prompt = tokenizer.apply_chat_template(question, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(conversation, tokenize=False)
        if not full.startswith(prompt):
            raise ValueError("The chat template's prompt is not a prefix of the full conversation; cannot mask it.")
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(full[len(prompt) :], add_special_tokens=False)["input_ids"]
        input_ids = (prompt_ids + answer_ids)[:max_length]
        labels = ([IGNORE_INDEX] * len(prompt_ids) + answer_ids)[:max_length]
        return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}

    return tokenize


def has_answer_tokens(example: dict) -> bool:
    """Whether any label survived truncation (an example without one contributes no loss)."""
    return any(label != IGNORE_INDEX for label in example["labels"])
