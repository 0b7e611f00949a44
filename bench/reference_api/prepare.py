"""The reference project's prepare API, over this project's data and scoring (for bench/side_by_side.py).

The reference (karpathy/autoresearch) trains with its own train.py, which imports
MAX_SEQ_LEN, TIME_BUDGET, Tokenizer, make_dataloader and evaluate_bpb from its
prepare.py. This module stands in for that prepare.py, so its train.py runs
unchanged on our tokens, under our time budget, and is scored by our harness:
evaluate_bpb exports the model the way prepare.finish does and hands the file to
evaluate.evaluate (phase 2), so both scripts' val_bpb come from the same tokens, bytes and
probes. It also stands in for the reference's FlashAttention-3 kernel (`fa3`),
which needs a download; torch's SDPA computes the same function for full windows.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

ROOT = Path(os.environ["AR_PROJECT_ROOT"])
sys.path.insert(0, str(ROOT))


def _load(file: str, name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


harness = _load("prepare.py", "harness")
_stand_in, sys.modules["prepare"] = sys.modules.get("prepare"), harness  # evaluate.py imports the harness as prepare
scorer = _load("evaluate.py", "scorer")
sys.modules["prepare"] = _stand_in

MAX_SEQ_LEN = harness.MAX_SEQ_LEN
TIME_BUDGET = harness.TIME_BUDGET


class Tokenizer:
    """What the reference's train.py asks of its tokenizer: the vocabulary size (and the BOS id)."""

    def __init__(self) -> None:
        self._tokenizer = harness.get_tokenizer()

    @classmethod
    def from_directory(cls) -> Tokenizer:
        return cls()

    def get_vocab_size(self) -> int:
        return self._tokenizer.vocab_size

    def get_bos_token_id(self) -> int:
        return self._tokenizer.bos_id


def make_dataloader(tokenizer: Tokenizer, batch_size: int, seq_len: int, split: str):
    """The reference's loader yields contiguous (inputs, targets, epoch); ours packs the same way (BOS-aligned
    best fit) and yields views of one [B, T + 1] batch."""
    for x, y in harness.make_dataloader(batch_size, seq_len, split):
        yield x.contiguous(), y.contiguous(), 1


def _flash_attn_func(q, k, v, causal: bool, window_size: tuple[int, int]):
    """FA3's call on [B, T, H, D] tensors, through SDPA. Sliding windows would need a mask: refused."""
    if window_size[0] >= 0 and window_size[0] < q.size(1):
        raise ValueError("sliding windows are not supported here: run the reference with WINDOW_PATTERN = 'L'")
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal,
                                         enable_gqa=k.size(2) != q.size(2))
    return out.transpose(1, 2)


fa3 = SimpleNamespace(flash_attn_func=_flash_attn_func)


def evaluate_bpb(model, tokenizer: Tokenizer, batch_size: int) -> float:
    """val_bpb as our phase 2 measures it: the model exported as prepare.finish exports it, then scored."""
    model = getattr(model, "_orig_mod", model)
    example = torch.zeros(harness.EVAL_BATCH, MAX_SEQ_LEN, dtype=torch.long, device=harness.DEVICE)
    path = Path(tempfile.mkdtemp(prefix="reference-")) / "model.pt2"
    # the caller runs this under its bf16 autocast; the exported program enters its own (prepare._Autocast)
    with torch.autocast(harness.DEVICE.type, enabled=False), torch.no_grad():
        torch.export.save(torch.export.export(harness._Autocast(model, torch.bfloat16), (example,)), path)
        result = scorer.evaluate(path)
    print(f"probe_max_change: {result['probe_max_change']}")
    return float.fromhex(result["val_bpb_hex"])
