"""Turning a problem into the text a model is asked to continue."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from steer.settings import DEFAULT_INSTRUCTION


def build_prompt(tokenizer: PreTrainedTokenizerBase, question: str, instruction: str = DEFAULT_INSTRUCTION) -> str:
    """The prompt for one problem: the question and the instruction as a user turn of the tokenizer's chat template
    (with the assistant turn opened), or, for a tokenizer without a template, plain text ending in "Answer:".

    Args:
        tokenizer (`PreTrainedTokenizerBase`): the model's tokenizer.
        question (`str`): the problem statement.
        instruction (`str`, defaults to asking for the final answer in `\\boxed{}`): appended after the question on
            its own line; an empty string adds nothing.

    Example:

    ```python
    >>> from steer.world.tokenizer import char_tokenizer
    >>> build_prompt(char_tokenizer(), "What is 2+3?", instruction="")
    '<|user|>What is 2+3?<|assistant|>'
    ```
    """
    content = f"{question}\n{instruction}" if instruction else question
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": content}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return f"Question: {content}\nAnswer:"


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    """Token ids of a prompt built by [`build_prompt`]: a chat-template string already holds its special tokens,
    so none are added to it; a plain prompt gets the tokenizer's usual ones (such as BOS)."""
    return tokenizer(prompt, add_special_tokens=not getattr(tokenizer, "chat_template", None))["input_ids"]
