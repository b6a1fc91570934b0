"""A character-level tokenizer built locally with the `tokenizers` library: no download, any alphabet.

Used by the tests' tiny models and by the built-in reasoning world, whose small model reads and writes characters.
"""

from __future__ import annotations

import string

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>")
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
DEFAULT_ALPHABET = string.printable
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>' + message['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def char_tokenizer(alphabet: str = DEFAULT_ALPHABET, model_max_length: int = 4096) -> PreTrainedTokenizerFast:
    """A fast tokenizer with one token per character of `alphabet`, left padding and a simple chat template.

    Token ids: `<pad>`=0, `<eos>`=1, `<bos>`=2, `<unk>`=3, the role markers `<|system|>`, `<|user|>`,
    `<|assistant|>` (one token each, used by the chat template), then the characters of `alphabet` in order
    (duplicates dropped). Characters outside the alphabet map to `<unk>`. It saves and loads with
    `save_pretrained` and `AutoTokenizer.from_pretrained` like any other.

    Args:
        alphabet (`str`, defaults to the printable ASCII characters): the characters to give a token each.
        model_max_length (`int`, defaults to 4096): recorded in the tokenizer's config.

    Example:

    ```python
    >>> from steer.world.tokenizer import char_tokenizer
    >>> tok = char_tokenizer("0123456789+=")
    >>> tok("12+3")["input_ids"]
    [8, 9, 17, 10]
    ```
    """
    chars = list(dict.fromkeys(alphabet))
    vocab = {token: index for index, token in enumerate([*SPECIAL_TOKENS, *ROLE_TOKENS, *chars])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
        unk_token="<unk>",
        padding_side="left",
        model_max_length=model_max_length,
        chat_template=CHAT_TEMPLATE,
        additional_special_tokens=list(ROLE_TOKENS),
    )
