"""Prompts, SFT examples and preference pairs for the RLHF chain, written as one data version.

The default task is sentiment-steered continuation on the Pang & Lee sentences: a prompt is the
first ``prompt_words`` words of a sentence, and a continuation is the next ``response_words``.

**The preference pairs are derived from the polarity labels, not ranked by people.** For each
sentence, its own continuation is paired with the continuation of a random sentence of the other
polarity; the positive one is ``chosen``. A reward model trained on them learns "positive beats
negative", which is what PPO and DPO then steer the policy towards. SFT learns to continue
review sentences of both polarities (prompt -> its real continuation), so any shift towards
positive text after SFT is the preference stage's doing.

Your own data: ``rlhf.data.source`` = a .jsonl of ``{"prompt", "chosen", "rejected"}`` rows. SFT
then learns prompt -> chosen (the usual demonstration data), and PPO samples the pairs' prompts
(or ``rlhf.data.prompts``, a .jsonl of ``{"prompt"}`` rows).

Layout of ``rlhf.data.out_dir`` (the manifest is written last, the folder swapped in atomically)::

    sft/{train,val,test}.jsonl + manifest.json   {"prompt", "completion"}: what the training core reads
    pairs/{train,test}.jsonl                     {"prompt", "chosen", "rejected"}; train: two halves by prompt
    prompts/{train,test}.jsonl                   {"prompt"}
    manifest.json                                version = hash of every file above
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

from peftflow.atomic import atomic_dir
from peftflow.data import DataError, read_checked, read_pang_lee, read_rows
from peftflow.rlhf.params import RlhfData

FILES = (
    "sft/train",
    "sft/val",
    "sft/test",
    "pairs/train",
    "pairs/test",
    "prompts/train",
    "prompts/test",
)
PAIR_COLUMNS = ("prompt", "chosen", "rejected")


def _cut(text: str, start: int, count: int) -> str:
    return " ".join(text.split()[start : start + count])


def derive_pang_lee(rows: list[dict[str, str]], cfg: RlhfData) -> dict[str, list[dict[str, str]]]:
    """Prompts, SFT examples and derived pairs from labelled sentences (see the module docstring)."""
    k, n = cfg.prompt_words, cfg.response_words
    usable = [r for r in rows if len(r["text"].split()) >= k + 3]  # at least 3 words to continue
    rng = random.Random(cfg.seed)
    rng.shuffle(usable)
    if cfg.test + cfg.val >= len(usable):
        raise DataError(f"rlhf.data: test ({cfg.test}) + val ({cfg.val}) leave no training sentences of {len(usable)}")
    test, pool = usable[: cfg.test], usable[cfg.test :]
    by_label: dict[str, list[dict[str, str]]] = {}
    for r in pool + test:
        by_label.setdefault(r["label"], []).append(r)
    if len(by_label) != 2:
        raise DataError(f"rlhf.data: pang_lee needs two polarities, found labels {sorted(by_label)}")

    def pairs(part: list[dict[str, str]], which: str) -> list[dict[str, str]]:
        # the other sentence comes from the same part, so test pairs share nothing with training
        own = {lab: [r for r in part if r["label"] == lab] for lab in by_label}
        out = []
        for r in part:
            other = rng.choice(own["-1" if r["label"] == "1" else "1"])
            mine, theirs = " " + _cut(r["text"], k, n), " " + _cut(other["text"], k, n)
            chosen, rejected = (mine, theirs) if r["label"] == "1" else (theirs, mine)
            out.append({"prompt": _cut(r["text"], 0, k), "chosen": chosen, "rejected": rejected})
        if not out:
            raise DataError(f"rlhf.data: no {which} pairs")
        return out

    sft = [{"prompt": _cut(r["text"], 0, k), "completion": _cut(r["text"], k, n)} for r in pool]
    return {
        "sft/val": sft[: cfg.val],
        "sft/train": sft[cfg.val :],
        "sft/test": [{"prompt": _cut(r["text"], 0, k), "completion": _cut(r["text"], k, n)} for r in test],
        "pairs/train": pairs(pool, "training"),
        "pairs/test": pairs(test, "test"),
        "prompts/train": [{"prompt": _cut(r["text"], 0, k)} for r in pool],
        "prompts/test": [{"prompt": _cut(r["text"], 0, k)} for r in test],
    }


def read_pairs(path: Path) -> list[dict[str, str]]:
    """Rows of a pairs .jsonl, each checked to have a non-empty prompt, chosen and rejected."""
    rows = read_rows(path)
    out = []
    for n, row in enumerate(rows, 1):
        missing = [c for c in PAIR_COLUMNS if not str(row.get(c) or "").strip()]
        if missing:
            raise DataError(
                f"{path} row {n}: column(s) {', '.join(missing)} missing or empty; "
                f"expected {', '.join(PAIR_COLUMNS)} (present: {', '.join(map(str, row))})"
            )
        chosen, rejected = (str(row[c]) for c in ("chosen", "rejected"))
        if chosen.strip() == rejected.strip():
            raise DataError(f"{path} row {n}: chosen and rejected are the same text")
        # a continuation starts after a space, as the policy writes it
        out.append(
            {"prompt": str(row["prompt"]).strip(), "chosen": " " + chosen.lstrip(), "rejected": " " + rejected.lstrip()}
        )
    return out


def split_pairs(pairs: list[dict[str, str]], cfg: RlhfData, prompts_file: str | None) -> dict[str, list[dict]]:
    """Your pairs split by prompt (no prompt is in both parts); SFT learns prompt -> chosen."""
    prompts = sorted({p["prompt"] for p in pairs})
    random.Random(cfg.seed).shuffle(prompts)
    if cfg.test >= len(prompts):
        raise DataError(f"rlhf.data.test: {cfg.test} held-out prompts of {len(prompts)} leave none to train on")
    test_prompts = set(prompts[: cfg.test])
    train = [p for p in pairs if p["prompt"] not in test_prompts]
    test = [p for p in pairs if p["prompt"] in test_prompts]
    sft = list(
        {
            p["prompt"] + "\0" + p["chosen"]: {"prompt": p["prompt"], "completion": p["chosen"].strip()} for p in train
        }.values()
    )
    if cfg.val >= len(sft):
        raise DataError(f"rlhf.data.val: {cfg.val} validation examples of {len(sft)} leave none to train on")
    rollout = [{"prompt": p} for p in prompts[cfg.test :]]
    if prompts_file:
        rows = read_rows(Path(prompts_file))
        rollout = []
        for n, row in enumerate(rows, 1):
            if not str(row.get("prompt") or "").strip():
                raise DataError(f"{prompts_file} row {n}: column 'prompt' missing or empty")
            rollout.append({"prompt": str(row["prompt"]).strip()})
    return {
        "sft/val": sft[: cfg.val],
        "sft/train": sft[cfg.val :],
        "sft/test": [{"prompt": p["prompt"], "completion": p["chosen"].strip()} for p in test],
        "pairs/train": train,
        "pairs/test": test,
        "prompts/train": rollout,
        "prompts/test": [{"prompt": p} for p in prompts[: cfg.test]],
    }


def prepare(cfg: RlhfData, raw_archive: Path) -> dict[str, Any]:
    """Build and write the RLHF data to ``cfg.out_dir``; the manifest."""
    if cfg.source == "pang_lee":
        parts, source = derive_pang_lee(read_pang_lee(raw_archive), cfg), "pang_lee-derived-pairs"
    else:
        parts, source = split_pairs(read_pairs(Path(cfg.source)), cfg, cfg.prompts), str(cfg.source)
    with atomic_dir(cfg.out_dir) as tmp:
        files = {}
        for name in FILES:
            body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in parts[name])
            (tmp / f"{name}.jsonl").parent.mkdir(parents=True, exist_ok=True)
            (tmp / f"{name}.jsonl").write_text(body, encoding="utf-8")
            files[name] = {"rows": len(parts[name]), "sha256": hashlib.sha256(body.encode()).hexdigest()}
        version = hashlib.sha256("".join(files[f]["sha256"] for f in FILES).encode()).hexdigest()[:12]
        derived = cfg.source == "pang_lee"
        note = "pairs derived from polarity labels, not human rankings" if derived else "pairs from the source file"
        manifest = {"version": version, "source": source, "format": "preference_pairs", "note": note, "files": files}
        # the SFT folder is a prepared-data folder the training core reads; same data version
        sft_files = {s: files[f"sft/{s}"] for s in ("train", "val", "test")}
        sft_manifest = {
            "version": version,
            "source": source,
            "format": "prompt_completion",
            "labels": None,
            "files": sft_files,
        }
        (tmp / "sft" / "manifest.json").write_text(json.dumps(sft_manifest, indent=2) + "\n")
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


HALVES = ("policy", "judge")


def half_of(prompt: str) -> str:
    """The half of the training pairs a prompt's pairs belong to (a hash, so it does not depend on
    the file's order and a prompt's pairs stay together): "policy" or "judge"."""
    return HALVES[hashlib.sha256(prompt.encode("utf-8")).digest()[0] % 2]


def pairs_for(pairs: list[dict[str, str]], which: str) -> list[dict[str, str]]:
    """``pairs`` if ``which`` is "all", else the pairs of that half (``rlhf.pairs``): the reward
    model and DPO learn from the "policy" half, the held-out judge from the "judge" half."""
    if which == "all":
        return pairs
    if which not in HALVES:
        raise DataError(f"rlhf.pairs: {which!r}; expected all, {' or '.join(HALVES)}")
    mine = [p for p in pairs if half_of(p["prompt"]) == which]
    if not mine:
        raise DataError(f"rlhf.pairs: {which}: none of the {len(pairs)} training pairs falls in that half")
    return mine


def read(out_dir: Path, name: str) -> list[dict[str, str]]:
    """One file of prepared RLHF data, e.g. ``pairs/train``; refuses half-written data."""
    if not (Path(out_dir) / "manifest.json").is_file():
        raise DataError(f"{out_dir}/manifest.json: no prepared RLHF data; run `peftflow rlhf prepare` first")
    return read_checked(Path(out_dir), name, json.loads((Path(out_dir) / "manifest.json").read_text()))
