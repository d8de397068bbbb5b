"""Library notices that say nothing to our users, filtered one by one (by message and module), so a normal
run prints only what this project says. Anything not named here still shows.

Our own deprecated calls are fixed at the call, not filtered; what is left comes from libraries calling
other libraries.
"""
from __future__ import annotations

import logging
import os
import warnings

NOISE = (
    # peft reads `model.is_gradient_checkpointing`, which transformers 5 deprecates in favour of
    # `is_activation_checkpointing`; nothing for a user to change.
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated", r"transformers\.modeling_utils"),
)
LOG_NOISE = {
    # On CPUs with AVX512-BF16 bitsandbytes tries to fetch a kernel from the Hugging Face hub at import and
    # logs its failure; offline, the built-in CPU kernel is used, which is what we want.
    "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward from kernels-community",
}


class _DropPrefix(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def quiet_library_noise() -> None:
    """Install the filters; call before the libraries are imported (bitsandbytes logs at import)."""
    # transformers' "Loading weights" and "Writing model shards" bars: a 7B model loads in seconds, and our
    # own bar is the one a user watches; read once, when huggingface_hub is imported
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for category, message, module in NOISE:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    for name, prefix in LOG_NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropPrefix) and f.prefix == prefix for f in logger.filters):
            logger.addFilter(_DropPrefix(prefix))
