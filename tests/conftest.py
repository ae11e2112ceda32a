"""Shared fixtures: tiny seeded Llama and Qwen2 causal LMs built from configs, and random token batches.

Every model is built in-process from a config with random weights, so no test reads or downloads
weights. The hub and datasets libraries are switched to offline mode before anything imports them.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

# The tiny models' matrices are too small to gain from intra-op threads. When other work keeps the
# cores busy, waiting for the thread pool costs far more than the arithmetic: one (24, 64) @ (64, 128)
# product took 9 ms with 2 threads and 10 µs with 1 on a loaded 2-core x86 machine (torch 2.13, CPU).
torch.set_num_threads(1)

HIDDEN_SIZE = 64
NUM_LAYERS = 6
VOCAB_SIZE = 128
SLIDING_WINDOW = 4
# Layer types of the tiny Qwen2 model: sliding and full attention mixed, so that pruning must slice the list.
QWEN2_LAYER_TYPES = [
    "full_attention",
    "sliding_attention",
    "full_attention",
    "sliding_attention",
    "sliding_attention",
    "full_attention",
]
QWEN2_MAX_WINDOW_LAYERS = 3


def _common_config() -> dict:
    return {
        "hidden_size": HIDDEN_SIZE,
        "num_hidden_layers": NUM_LAYERS,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 128,
        "vocab_size": VOCAB_SIZE,
        "max_position_embeddings": 128,
        # Without an end-of-sequence token, greedy generation always runs for max_new_tokens.
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": 0,
        "attn_implementation": "eager",
    }


def build_tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    """Build a 6-layer LlamaForCausalLM with hidden size 64 and seeded random weights, in eval mode."""
    config = LlamaConfig(**_common_config())
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.to(dtype).eval()


def build_tiny_qwen2(seed: int = 0, dtype: torch.dtype = torch.float32) -> Qwen2ForCausalLM:
    """Build a 6-layer Qwen2ForCausalLM whose layers mix sliding-window and full attention."""
    config = Qwen2Config(
        **_common_config(),
        use_sliding_window=True,
        sliding_window=SLIDING_WINDOW,
        max_window_layers=QWEN2_MAX_WINDOW_LAYERS,
        layer_types=list(QWEN2_LAYER_TYPES),
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    return model.to(dtype).eval()


def random_batch(
    batch_size: int, seq_len: int, seed: int = 0, lengths: list[int] | None = None
) -> dict[str, torch.Tensor]:
    """Make ``input_ids`` and ``attention_mask`` of shape ``(B, T)`` from random token ids.

    ``lengths`` gives the number of valid tokens of each row. Rows shorter than ``seq_len`` are
    right-padded: their tail keeps its random ids but has attention mask 0.
    """
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB_SIZE, (batch_size, seq_len), generator=generator)
    attention_mask = torch.ones(batch_size, seq_len, dtype=torch.long)
    if lengths is not None:
        if len(lengths) != batch_size:
            raise ValueError(f"Expected {batch_size} row lengths, got {len(lengths)}.")
        for row, length in enumerate(lengths):
            attention_mask[row, length:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


@pytest.fixture
def tiny_llama() -> LlamaForCausalLM:
    return build_tiny_llama()


@pytest.fixture
def tiny_qwen2() -> Qwen2ForCausalLM:
    return build_tiny_qwen2()


@pytest.fixture
def llama_factory():
    """The tiny Llama builder, for tests that need several models, seeds or dtypes."""
    return build_tiny_llama


@pytest.fixture(params=["llama", "qwen2"])
def tiny_model(request):
    """Each tiny model family in turn."""
    builders = {"llama": build_tiny_llama, "qwen2": build_tiny_qwen2}
    return builders[request.param]()


@pytest.fixture
def make_batch():
    """The random batch builder; see :func:`random_batch`."""
    return random_batch
