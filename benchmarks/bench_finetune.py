"""The kernel of a Hugging Face GPT-2 as its users call it: torch_ntk next to the torch.func
recipe of PyTorch's NTK tutorial, and the pseudo-NTK next to the full kernel.

Usage: python benchmarks/bench_finetune.py [--n 32] [--layers 4] [--vocab 256] [--rounds 3]
                                           [--json out.json]

GPT-2 built from a config (random weights, no download): ``--layers`` blocks of width 64, a
``--vocab``-token table tied to the LM head (50257 is GPT-2's own), 16 tokens, the last
position's logits over 10 tokens (K = 10), float32, x2 = None. Measured in
one process, the methods alternating for ``--rounds`` rounds (best of ``--repeats`` each):

- ``recipe``: ``vmap(jacrev(f))`` of ``functional_call`` per sample, then ``Σ_p J J'ᵀ`` by
  einsum (the tutorial's ``empirical_ntk_jacobian_contraction``, with the dict input);
- ``auto``: ``empirical_ntk(gpt2, {"input_ids", "attention_mask"}, output=...)``, full kernel;
- ``pntk``: the same with ``mode="pntk"``.

The three agree (the recipe's kernel reduced to the pseudo-NTK) to float32 rounding; the run
records the largest relative difference.
"""
from __future__ import annotations

import argparse
import json
import time
import warnings

import torch
from torch.func import functional_call, jacrev, vmap

import torch_ntk

TOKENS = 16
OUTPUTS = 10


def build(layers: int, seed: int = 0, vocab: int = 256):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=layers, n_embd=64, n_head=4, vocab_size=vocab, n_positions=32,
                        bos_token_id=0, eos_token_id=0)
    config._attn_implementation = "eager"    # the sdpa mask path branches on the mask's values,
    return GPT2LMHeadModel(config).eval()    # which vmap (the recipe) can't run


def batch(n: int, seed: int = 1, vocab: int = 256) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, TOKENS), generator=g)
    mask = torch.ones(n, TOKENS, dtype=torch.long)
    mask[::3, TOKENS - 4:] = 0          # a third of the prompts padded
    return {"input_ids": ids, "attention_mask": mask}


def select(o):
    return o.logits[:, -1, :OUTPUTS]


def recipe(model, x: dict) -> torch.Tensor:
    """(N, N, K, K) by the tutorial's Jacobian contraction."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def f(p, ids, mask):
        out = functional_call(model, p, (), {"input_ids": ids[None], "attention_mask": mask[None]})
        return select(out)[0]

    jac = vmap(jacrev(f), (None, 0, 0))(params, x["input_ids"], x["attention_mask"])
    jac = [j.flatten(2) for j in jac.values()]
    return sum(torch.einsum("naf,mbf->nmab", j, j) for j in jac)


def best(fn, repeats: int) -> tuple[float, torch.Tensor]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return min(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    model = build(args.layers, vocab=args.vocab)
    x = batch(args.n, vocab=args.vocab)
    methods = {
        "recipe": lambda: recipe(model, x),
        "auto": lambda: torch_ntk.empirical_ntk(model, x, output=select),
        "pntk": lambda: torch_ntk.empirical_ntk(model, x, output=select, mode="pntk"),
    }
    for fn in methods.values():       # warm-up (and the values to compare)
        fn()
    rounds = []
    for r in range(args.rounds):
        row = {}
        for name, fn in methods.items():
            row[name], out = best(fn, args.repeats)
            row[f"{name}_value"] = out
        rounds.append(row)
        print(f"round {r + 1}: " + ", ".join(f"{k} {row[k]:.3f} s" for k in methods))
    ref = rounds[0]["recipe_value"]
    scale = ref.abs().max()
    diff = {"auto": float((rounds[0]["auto_value"] - ref).abs().max() / scale),
            "pntk": float((rounds[0]["pntk_value"] - ref.sum((2, 3)) / OUTPUTS).abs().max()
                          / scale)}
    result = {
        "n": args.n, "layers": args.layers, "vocab": args.vocab, "tokens": TOKENS,
        "outputs": OUTPUTS,
        "dtype": "float32", "threads": torch.get_num_threads(), "torch": torch.__version__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "rounds": [{k: v for k, v in row.items() if not k.endswith("_value")} for row in rounds],
        "recipe_over_auto": [row["recipe"] / row["auto"] for row in rounds],
        "auto_over_pntk": [row["auto"] / row["pntk"] for row in rounds],
        "max_relative_difference": diff,
    }
    print("recipe / auto per round: " + ", ".join(f"{v:.2f}x" for v in result["recipe_over_auto"]))
    print("auto / pntk per round: " + ", ".join(f"{v:.2f}x" for v in result["auto_over_pntk"]))
    print(f"largest relative difference to the recipe: {diff}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
