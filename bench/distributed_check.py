"""Each distributed strategy against one process, on the same global batch, through ``peftflow``'s
own ``train``: the loss trajectory, the saved adapter, exact resume, tokens/s and peak memory.

One process trains with ``train.batch_size = 2 x BATCH``; each strategy trains on NPROC processes
with ``BATCH`` each (gradient accumulation ACCUM), once straight and once interrupted after a
checkpoint and resumed. Prints one Markdown table: the largest loss and adapter differences to the
one-process run and to DDP, whether the resumed run equals the straight one bit for bit, and the
throughput/memory figures (CPU: gloo processes sharing the cores; CUDA: one GPU per process).

    python bench/distributed_check.py                        # the tiny Llama, CPU, 2 gloo processes
    SIZE=smol135m STEPS=10 python bench/distributed_check.py  # the embedded model's shape (random weights)
    NPROC=1 STRATEGIES=fsdp,deepspeed python bench/distributed_check.py  # one GPU: sharding/offload alone

Environment: SIZE (tiny | smol135m), STRATEGIES (comma list of ddp, fsdp, fsdp-sharded, zero2, zero3),
NPROC (default 2), BATCH (per process, default 4), ACCUM (default 2), STEPS (default 6), LR (default 5e-3),
METHOD (default lora, dropout off: each process draws its own dropout masks), SET (more params
overrides, space-separated, e.g. ``SET="train.max_grad_norm=null"``).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARAMS = ROOT / "params"
STRATEGIES = {
    "ddp": ["distributed.strategy=ddp"],
    "fsdp": ["distributed.strategy=fsdp"],
    "fsdp-sharded": ["distributed.strategy=fsdp", "distributed.fsdp.state_dict=sharded"],
    "zero2": ["distributed.strategy=deepspeed", f"distributed.deepspeed={PARAMS / 'deepspeed' / 'zero2.json'}"],
    "zero3": ["distributed.strategy=deepspeed", f"distributed.deepspeed={PARAMS / 'deepspeed' / 'zero3.json'}"],
}
SIZES = {
    "tiny": dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
    ),
    "smol135m": dict(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3
    ),
}


def _model(out: Path, size: str) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from peftflow.model import embedded_gguf

    gguf = embedded_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = LlamaConfig(
        vocab_size=len(tokenizer), max_position_embeddings=512, tie_word_embeddings=True, initializer_range=0.3,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        **SIZES[size],
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _weights(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return {k: v for f in sorted((run_dir / "model").glob("*.safetensors")) for k, v in load_file(f).items()}


def _diff(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


def main() -> None:
    from peftflow.config import load_params
    from peftflow.data import prepare
    from peftflow.training.sft import train
    from tests.conftest import make_rows

    env = os.environ
    size, method = env.get("SIZE", "tiny"), env.get("METHOD", "lora")
    nproc, batch, accum = int(env.get("NPROC", "2")), int(env.get("BATCH", "4")), int(env.get("ACCUM", "2"))
    steps, lr = int(env.get("STEPS", "6")), env.get("LR", "5.0e-3")
    names = env.get("STRATEGIES", ",".join(STRATEGIES)).split(",")
    tmp = Path(tempfile.mkdtemp(prefix="peftflow-dist-"))
    data_file = tmp / "reviews.jsonl"
    data_file.write_text("".join(json.dumps(r) + "\n" for r in make_rows(400)))
    base = [
        f"model.name_or_path={_model(tmp / 'model', size)}", f"data.source={data_file}",
        f"data.out_dir={tmp / 'prepared'}", "data.split.test=32", "data.split.val=16", "train.eval_examples=16",
        f"train.output_dir={tmp / 'runs'}", f"train.max_steps={steps}", f"train.grad_accum={accum}",
        f"train.lr={lr}", "train.warmup_steps=0", "train.eval_every=0", "train.save_every=2",
        *(["method.dropout=0.0"] if method in ("lora", "dora", "qlora", "adalora") else []),
        *env.get("SET", "").split(),
    ]  # fmt: skip

    def params(*extra: str):
        p = load_params(method, PARAMS, [*base, *extra])
        if not (p.data.out_dir / "manifest.json").is_file():
            prepare(p.data)
        return p

    one = train(params(f"train.batch_size={2 * batch}", "train.run_name=one"), progress=False)
    rows, weights = [], {"one": _weights(tmp / "runs" / "one")}
    rows.append(("1 process", one, 0.0, 0.0, None, None, "-"))
    for name in names:
        common = [*STRATEGIES[name], f"distributed.num_processes={nproc}", f"train.batch_size={batch}"]
        straight = train(params(*common, f"train.run_name={name}"), progress=False)
        cut = params(*common, f"train.run_name={name}-resumed")
        train(cut, stop_after=steps // 2, progress=False)
        resumed = train(cut, progress=False)
        weights[name] = _weights(tmp / "runs" / name)
        exact = resumed.history == straight.history and _diff(weights[name], _weights(cut.run_dir)) == 0.0
        loss = max(abs(a["loss"] - b["loss"]) for a, b in zip(straight.history, one.history, strict=True))
        vs_ddp = _diff(weights[name], weights["ddp"]) if "ddp" in weights else None
        rows.append((f"{name} x{nproc}", straight, loss, _diff(weights[name], weights["one"]), vs_ddp, None, exact))

    print(f"\n{method} on {size}, {steps} steps, global batch {2 * batch} x {accum} accumulation, lr {lr}")
    print("| run | loss diff vs 1 process | adapter diff vs 1 process | adapter diff vs ddp | resume exact "
          "| tokens/s | peak memory MiB (max process) | wall s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for label, s, loss, adapter, vs_ddp, _, exact in rows:
        ddp = "-" if vs_ddp is None else f"{vs_ddp:.1e}"
        print(f"| {label} | {loss:.1e} | {adapter:.1e} | {ddp} | {exact} | {s.tokens_per_s:,.0f} | "
              f"{s.peak_memory_bytes / 2**20:,.0f} | {s.wall_seconds:.1f} |")  # fmt: skip


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))  # tests.conftest's rows
    main()
