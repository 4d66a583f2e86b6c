"""Per method: one training step of peftflow's core against a plain transformers + peft loop, in one
process, on the same model, batches and sequence length; prints tokens/s and peak memory, and ratios.

Both sides train the same randomly initialized Llama-shaped model (weights do not change speed)
with the same method (``peftflow.methods``: the peft config or hand-written module peftflow uses),
the same optimizer (the method's: paged AdamW for QLoRA on CUDA, else AdamW) and batches of prompt
+ short answer. The plain loop is what a user writes by hand: right padding, ``model(...,
labels=...)`` (full-sequence logits). peftflow's step is :func:`peftflow.training.optim.optimizer_step`, the
one ``peftflow train`` runs, at the precision ``train.mixed_precision: auto`` resolves to (bf16
autocast on CUDA and on CPUs with AVX512-BF16 or AMX, frozen base weights stored in bf16 as
``peftflow train`` stores them; ``PRECISION=no`` for fp32). The plain loop: bf16 autocast on CUDA,
fp32 on CPU (what a hand-written CPU loop runs).
Peak memory: CUDA max allocated; CPU peak RSS, reset before each measurement (it includes what the
process holds anyway, so CPU ratios understate the difference).

    python bench/step_bench.py                                     # CPU: a small model, every method
    SIZE=smol135m METHODS=lora,ia3 python bench/step_bench.py      # the embedded model's shape
    SIZE=1b SEQ=1024 BATCH=8 ANSWER=2 python bench/step_bench.py  # CUDA: Llama-shaped 1.1B

Environment: SIZE (tiny | smol135m | 1b), METHODS (comma list; default every method), PRECISION
(peftflow's ``train.mixed_precision``: auto | no | bf16), BATCH, SEQ
(prompt tokens), ANSWER (answer tokens), STEPS, WARM, ORDER (``peftflow,plain`` to measure peftflow
first: a check that the order does not favour either side). Prints one JSON line per (method, loop), then a
Markdown table with the ratios (peftflow / plain).
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from functools import cache, partial
from pathlib import Path

import torch
from accelerate import Accelerator
from transformers import LlamaConfig, LlamaForCausalLM, get_scheduler

from peftflow.attention import use_fp32_cpu_attention
from peftflow.distributed.strategy import forget_other_precision
from peftflow.methods import get_method, method_names
from peftflow.tokens import Encoded, collate, completion_loss_sum, completion_tokens
from peftflow.training.meters import count_parameters, peak_memory_bytes, reset_peak_memory
from peftflow.training.optim import frozen_linears_to_bf16, mixed_precision, optimizer_step
from peftflow.training.sft import bf16_frozen_base

SIZES = {  # hidden, layers, heads, kv heads, intermediate, vocab
    "tiny": (256, 4, 4, 2, 768, 49152),
    "smol135m": (576, 30, 9, 3, 1536, 49152),
    "1b": (2048, 22, 32, 4, 5632, 32000),  # TinyLlama-1.1B's shape
}


def config(size: str) -> LlamaConfig:
    h, n_layers, heads, kv, inter, vocab = SIZES[size]
    return LlamaConfig(
        hidden_size=h,
        num_hidden_layers=n_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        intermediate_size=inter,
        vocab_size=vocab,
        tie_word_embeddings=size != "1b",
        max_position_embeddings=4096,
    )


@cache
def saved(size: str) -> Path:
    """The random model on disk, for methods that must load it (QLoRA quantizes while loading)."""
    out = Path(tempfile.mkdtemp(prefix=f"step-bench-{size}-"))
    torch.manual_seed(0)
    LlamaForCausalLM(config(size)).to(torch.bfloat16).save_pretrained(out)
    return out


def method_params(method: str, steps: int):
    """The method's defaults, made to fit a model with no tokenizer: soft prompts start at random
    (the init does not change a step's cost) and AdaLoRA's schedule spans the timed steps."""
    params = get_method(method).Params()
    fields = type(params).model_fields
    update = {"init": "random"} if "init" in fields and "random" in str(fields["init"].annotation) else {}
    if "total_step" in fields:
        update["total_step"] = steps
    return params.model_copy(update=update)


def build(size: str, method: str, device, steps: int, precision: str = "no", peftflow: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    m = get_method(method)
    params = method_params(method, steps)
    if m.quantizes_base:  # quantized on load, placed by bitsandbytes
        kwargs = m.load_kwargs(params)
        if device.type == "cuda":
            kwargs["device_map"] = {"": 0}
        base = LlamaForCausalLM.from_pretrained(saved(size), dtype=torch.float32, **kwargs)
        return m.apply(base, params)
    base = LlamaForCausalLM(config(size))
    if peftflow:  # as load_base_model and build_model prepare it for peftflow train
        use_fp32_cpu_attention(base)
    model = m.apply(base, params).to(device)
    if peftflow and bf16_frozen_base(m, precision):
        frozen_linears_to_bf16(model)
    return model


def make_optimizer(model, method: str, steps: int) -> torch.optim.Optimizer:
    trainable = [p for p in model.parameters() if p.requires_grad]
    return get_method(method).optimizer(trainable, 1e-4, 0.0, method_params(method, steps))


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


def measure(size, method, loop, data, warm, device, precision) -> dict:
    """``precision``: peftflow's (resolved ``train.mixed_precision``); the plain loop's is fixed."""
    if loop == "plain":
        precision = "bf16" if device.type == "cuda" else "no"
    reset_peak_memory()
    model = build(size, method, device, len(data), precision, loop == "peftflow").train()
    optimizer = make_optimizer(model, method, len(data))
    scheduler = get_scheduler("constant", optimizer)
    forget_other_precision(precision)  # the plain loop's Accelerator ran at another one
    accelerator = Accelerator(mixed_precision=precision)
    times, tokens = [], 0
    virtual = get_method(method).input_virtual_tokens(method_params(method, len(data)))
    objective = partial(completion_loss_sum, virtual=virtual)
    for i, rows in enumerate(data):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        if loop == "peftflow":
            batch = collate(rows, 0)
            optimizer_step(model, [batch], completion_tokens, objective, optimizer, scheduler, accelerator, 1.0)
            n = int(batch["attention_mask"].sum())
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
        "precision": precision,
        "trainable": count_parameters(model)[0],
        "step_s_median": statistics.median(times),
        "tokens_per_s": tokens / sum(times),
        "peak_gib": peak_memory_bytes() / 2**30,
    }
    del model, optimizer
    return result


def main() -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    size = os.environ.get("SIZE", "tiny")
    methods = os.environ.get("METHODS", ",".join(method_names())).split(",")
    batch, seq, answer = (
        int(os.environ.get("BATCH", 16)),
        int(os.environ.get("SEQ", 48)),
        int(os.environ.get("ANSWER", 2)),
    )
    steps, warm = int(os.environ.get("STEPS", 8)), int(os.environ.get("WARM", 2))
    order = os.environ.get("ORDER", "plain,peftflow").split(",")  # which loop runs first, per method
    precision = mixed_precision(os.environ.get("PRECISION", "auto"))
    data = batches(steps + warm, batch, seq, answer, SIZES[size][5])
    plain_precision = "bf16" if device.type == "cuda" else "fp32"
    table = [
        f"{size}, batch {batch}, prompts {int(0.6 * seq)}-{seq} + {answer} tokens, {device}; "
        f"peftflow {'fp32' if precision == 'no' else precision}, plain loop {plain_precision}",
        "",
        "| method | trainable | plain tok/s | peftflow tok/s | ratio | plain peak GiB | peftflow peak GiB | ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method in methods:
        try:
            rows = {loop: measure(size, method, loop, data, warm, device, precision) for loop in order}
        except Exception as e:  # e.g. bitsandbytes missing: say so, measure the rest
            print(json.dumps({"size": size, "method": method, "error": " ".join(str(e).split())[:300]}), flush=True)
            continue
        for r in rows.values():
            print(json.dumps(r), flush=True)
        p, f = rows["plain"], rows["peftflow"]
        table.append(
            f"| {method} | {f['trainable']:,} | {p['tokens_per_s']:,.0f} | {f['tokens_per_s']:,.0f} | "
            f"x{f['tokens_per_s'] / p['tokens_per_s']:.2f} | {p['peak_gib']:.2f} | {f['peak_gib']:.2f} | "
            f"x{f['peak_gib'] / p['peak_gib']:.2f} |"
        )
    print("\n".join(table), flush=True)


if __name__ == "__main__":
    main()
