"""The pseudo-NTK of a small GPT-2 over its LoRA parameters, and kernel regression on it.

    python examples/hf_lora_kernel.py --prompts 300

A GPT-2 built from a config (random weights, no download) gets rank-r LoRA adapters on the
attention projections (``c_attn``); the kernel is taken over the adapters only (what LoRA
fine-tuning trains), on the last position's logits, as the pseudo-NTK ``(1/K) Σ_ab Θ_ab``
(one output instead of K). The task: does a prompt contain token 7? Kernel ridge regression on
the kernel fits the training prompts and is scored on held-out ones, next to the same
regression on the pseudo-NTK over all parameters.

Needs ``transformers``. Prints the times and the test accuracies.
"""
from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import torch_ntk


class LoRA(nn.Module):
    """``base(x) + scale · x A Bᵀ`` with the base frozen; B starts at zero as in LoRA, A random."""

    def __init__(self, base: nn.Module, d_in: int, d_out: int, rank: int, scale: float) -> None:
        super().__init__()
        self.base, self.scale = base, scale
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.lora_a = nn.Parameter(torch.randn(d_in, rank) / rank ** 0.5)
        self.lora_b = nn.Parameter(torch.zeros(d_out, rank))

    def forward(self, x):
        return self.base(x) + self.scale * (x @ self.lora_a) @ self.lora_b.T


def build(rank: int, layers: int, width: int, vocab: int, seed: int) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=layers, n_embd=width, n_head=4, vocab_size=vocab,
                        n_positions=32, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config).eval()
    for block in model.transformer.h:
        block.attn.c_attn = LoRA(block.attn.c_attn, width, 3 * width, rank, scale=1.0)
    return model


def prompts(n: int, length: int, vocab: int, seed: int):
    """Token prompts, right-padded to ``length`` (masks mark the real tokens), and the target:
    +1 when token 7 occurs in the prompt, -1 otherwise (about half each)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(8, vocab, (n, length), generator=g)
    lengths = torch.randint(length // 2, length + 1, (n,), generator=g)
    has = torch.rand(n, generator=g) < 0.5
    where = (torch.rand(n, generator=g) * lengths).long()
    ids[has, where[has]] = 7
    mask = (torch.arange(length)[None] < lengths[:, None]).long()
    ids = ids * mask
    return {"input_ids": ids, "attention_mask": mask}, has.double() * 2 - 1


def ridge_accuracy(k_train: torch.Tensor, k_test: torch.Tensor, y_train: torch.Tensor,
                   y_test: torch.Tensor, ridge: float = 1e-3) -> float:
    """Kernel ridge regression on the kernel (scaled to unit mean diagonal); test sign
    accuracy."""
    scale = k_train.diagonal().mean()
    eye = torch.eye(k_train.shape[0], dtype=k_train.dtype)
    alpha = torch.linalg.solve(k_train / scale + ridge * eye, y_train)
    return float(((k_test / scale @ alpha).sign() == y_test).double().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=300, help="training prompts")
    parser.add_argument("--test", type=int, default=100, help="held-out prompts")
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--length", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    vocab = 64
    model = build(args.rank, args.layers, args.width, vocab, args.seed).double()
    x, y = prompts(args.prompts + args.test, args.length, vocab, args.seed + 1)
    train = {k: v[:args.prompts] for k, v in x.items()}
    test = {k: v[args.prompts:] for k, v in x.items()}
    last = lambda o: o.logits[:, -1]                                     # (N, vocab)
    lora = lambda name, p: "lora_" in name
    n_lora = sum(p.numel() for n, p in model.named_parameters() if lora(n, p))

    start = time.perf_counter()
    k_train = torch_ntk.empirical_ntk(model, train, output=last, mode="pntk", params=lora)
    k_test = torch_ntk.empirical_ntk(model, test, train, output=last, mode="pntk", params=lora)
    seconds = time.perf_counter() - start
    acc = ridge_accuracy(k_train, k_test, y[:args.prompts], y[args.prompts:])
    print(f"pseudo-NTK over the {n_lora} LoRA parameters: {seconds:.1f} s, "
          f"test accuracy {acc:.3f}")

    for p in model.parameters():      # the frozen base weights too
        p.requires_grad_(True)
    start = time.perf_counter()
    a_train = torch_ntk.empirical_ntk(model, train, output=last, mode="pntk")
    a_test = torch_ntk.empirical_ntk(model, test, train, output=last, mode="pntk")
    seconds = time.perf_counter() - start
    acc = ridge_accuracy(a_train, a_test, y[:args.prompts], y[args.prompts:])
    n_all = sum(p.numel() for p in model.parameters())
    print(f"pseudo-NTK over all {n_all} parameters: {seconds:.1f} s, test accuracy {acc:.3f}")


if __name__ == "__main__":
    main()
