"""Save a small Hugging Face GPT-2 with ``save_pretrained``: a stand-in for the model folders you download or fine-tune.

    python hf_models.py --seed 0 -o models/A             # config.json, generation_config.json, model.safetensors
    python hf_models.py --seed 1 -o models/B --shard     # the weights in several shards and an index

The weights are random (seeded); the layout is exactly what ``transformers`` writes for any model.
"""

from __future__ import annotations

import argparse
import warnings

import torch
import transformers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("-o", "--output", required=True, help="the folder to write")
    parser.add_argument("--shard", action="store_true", help="write the weights in shards of at most 200 kB")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = transformers.GPT2Config(vocab_size=1000, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                                         bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config)
    model.save_pretrained(args.output, **({"max_shard_size": "200kB"} if args.shard else {}))
    print(f"saved a GPT-2 ({sum(p.numel() for p in model.parameters())} parameters) to {args.output}")


if __name__ == "__main__":
    main()
