"""One training step of peftflow's core against a plain transformers + peft loop, in one process.

Both sides train the same randomly initialized Llama-shaped model (weights do not change speed)
with the same method, optimizer and batches of prompt + short answer. The plain loop is what a
user writes by hand: right padding, ``model(..., labels=...)`` (full-sequence logits).
peftflow's step is :func:`peftflow.train.optimizer_step`, the one ``peftflow train`` runs.

    python bench/step_bench.py                       # CPU: a small model, LoRA and full
    SIZE=smol135m METHODS=lora python bench/step_bench.py   # the embedded model's shape
    SIZE=1b SEQ=1024 BATCH=8 python bench/step_bench.py     # on CUDA (bf16 autocast)

Environment: SIZE (tiny | smol135m | 1b), METHODS (comma list), BATCH, SEQ (prompt tokens),
ANSWER (answer tokens), STEPS, WARM. Prints one JSON line per (method, loop) and the ratios.
"""

from __future__ import annotations

import json
import os
import statistics
import time

import torch
from accelerate import Accelerator
from transformers import LlamaConfig, LlamaForCausalLM, get_scheduler

from peftflow.methods import get_method
from peftflow.tokens import Encoded, collate
from peftflow.train import count_parameters, optimizer_step

SIZES = {  # hidden, layers, heads, kv heads, intermediate, vocab
    "tiny": (256, 4, 4, 2, 768, 49152),
    "smol135m": (576, 30, 9, 3, 1536, 49152),
    "1b": (2048, 22, 32, 4, 5632, 32000),
}


def build(size: str, method: str, device) -> torch.nn.Module:
    h, n_layers, heads, kv, inter, vocab = SIZES[size]
    config = LlamaConfig(
        hidden_size=h,
        num_hidden_layers=n_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        intermediate_size=inter,
        vocab_size=vocab,
        tie_word_embeddings=size != "1b",
        max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    m = get_method(method)
    return m.apply(LlamaForCausalLM(config), m.Params()).to(device)


def batches(n: int, batch: int, seq: int, answer: int, vocab: int) -> list[list[Encoded]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        rows = []
        for _ in range(batch):  # prompt lengths vary as real data does: 60-100% of SEQ
            length = int(seq * (0.6 + 0.4 * torch.rand(1, generator=g).item()))
            ids = torch.randint(3, vocab, (length + answer,), generator=g).tolist()
            rows.append(Encoded(ids[:length], ids[length:]))
        out.append(rows)
    return out


def plain_step(model, rows: list[Encoded], optimizer, scheduler, device, autocast) -> tuple[float, int]:
    """What a hand-written loop does: right padding, labels=..., full logits."""
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        seq = r.prompt + r.completion
        ids[i, : len(seq)] = torch.tensor(seq)
        labels[i, len(r.prompt) : len(seq)] = torch.tensor(r.completion)
        mask[i, : len(seq)] = 1
    with autocast():
        loss = model(input_ids=ids.to(device), attention_mask=mask.to(device), labels=labels.to(device)).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item(), int(mask.sum())


def measure(size, method, loop, data, warm, device) -> dict:
    model = build(size, method, device).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    scheduler = get_scheduler("constant", optimizer)
    accelerator = Accelerator(mixed_precision="bf16" if device.type == "cuda" else "no")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, tokens = [], 0
    for i, rows in enumerate(data):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        if loop == "peftflow":
            _, n = optimizer_step(model, [collate(rows, 0)], optimizer, scheduler, accelerator, 1.0)
        else:
            _, n = plain_step(model, rows, optimizer, scheduler, device, accelerator.autocast)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warm:
            times.append(time.perf_counter() - t)
            tokens += n
    result = {
        "size": size,
        "method": method,
        "loop": loop,
        "device": str(device),
        "trainable": count_parameters(model)[0],
        "step_s_median": statistics.median(times),
        "tokens_per_s": tokens / sum(times),
    }
    if device.type == "cuda":
        result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    del model, optimizer
    return result


def main() -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    size = os.environ.get("SIZE", "tiny")
    methods = os.environ.get("METHODS", "lora,full").split(",")
    batch, seq, answer = (
        int(os.environ.get("BATCH", 16)),
        int(os.environ.get("SEQ", 48)),
        int(os.environ.get("ANSWER", 2)),
    )
    steps, warm = int(os.environ.get("STEPS", 8)), int(os.environ.get("WARM", 2))
    data = batches(steps + warm, batch, seq, answer, SIZES[size][5])
    for method in methods:
        rows = {loop: measure(size, method, loop, data, warm, device) for loop in ("plain", "peftflow")}
        for r in rows.values():
            print(json.dumps(r), flush=True)
        ratio = rows["peftflow"]["tokens_per_s"] / rows["plain"]["tokens_per_s"]
        line = f"{size} {method}: peftflow {rows['peftflow']['tokens_per_s']:,.0f} tok/s vs plain "
        line += f"{rows['plain']['tokens_per_s']:,.0f} tok/s -> x{ratio:.2f}"
        if "peak_gib" in rows["plain"]:
            line += f"; peak {rows['peftflow']['peak_gib']:.2f} vs {rows['plain']['peak_gib']:.2f} GiB"
        print(line, flush=True)


if __name__ == "__main__":
    main()
