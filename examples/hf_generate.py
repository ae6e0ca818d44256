"""Load an lmforge checkpoint with plain Hugging Face transformers (no lmforge import) and
continue a prompt: the checkpoint format is transformers' own.

    python examples/hf_generate.py runs/demo "The import statement"
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging


def main() -> int:
    """Resolve the run's latest checkpoint, load it with transformers, and sample from it."""
    if len(sys.argv) < 2:
        print(__doc__)
        return 2
    path = Path(sys.argv[1])
    if (path / "latest").is_file() and not (path / "config.json").exists():
        path = path / (path / "latest").read_text().strip()
    prompt = sys.argv[2] if len(sys.argv) > 2 else "The import statement"
    hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = tokenizer(tokenizer.bos_token + prompt, return_tensors="pt", add_special_tokens=False)
    torch.manual_seed(0)
    out = model.generate(
        **ids,
        max_new_tokens=40,
        do_sample=True,
        temperature=0.8,
        top_k=40,
        pad_token_id=tokenizer.pad_token_id,
    )
    text = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    print(
        f"transformers loaded {path} as {type(model).__name__} "
        f"({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters)"
    )
    print(f"  {prompt!r} -> {text!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
