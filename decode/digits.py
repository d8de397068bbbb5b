"""Token ids of the answer digits, checked against the tokenizer at start-up."""
from __future__ import annotations

from engine.errors import UserError


def digit_token_ids(tokenizer, prompt_ids: list[int], max_digit: int = 9) -> list[int]:
    """ids[d-1] is the token of digit d as the first token after the answer prefix.

    The answer is tokenized apart from the prompt in training, so the digit must be one token on its
    own and also the token that follows the prompt when both are tokenized together; a tokenizer that
    splits or merges digits there is an error, not a silent mismatch.
    """
    prompt_text = tokenizer.decode(prompt_ids, skip_special_tokens=False)
    ids = []
    for d in range(1, max_digit + 1):
        alone = tokenizer.encode(str(d), add_special_tokens=False)
        joined = tokenizer.encode(prompt_text + str(d), add_special_tokens=False)
        if len(alone) != 1 or joined != list(prompt_ids) + alone:
            raise UserError(f"tokenizer: digit {d} is not one token after the answer prefix "
                            f"(alone {alone}, after the prompt {joined[len(prompt_ids):]})")
        ids.append(alone[0])
    return ids
