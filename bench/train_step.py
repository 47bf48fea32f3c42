"""Benchmark one full ViLBERT pretraining step (forward with all three losses, backward, fused AdamW).

Synthetic batches in the pretraining layout: 36 tokens (15% masked), 36 regions + [IMG] (15% masked),
50% misaligned pairs. Several batches with different mask counts are cycled, so the sparse MLM/region heads
see varying shapes as in real training. Prints a markdown table that names device, torch version, git
commit and date. No timing is asserted anywhere.

    python bench/train_step.py --config small --batch-sizes 8,32 --precision fp32,bf16       # CPU
    python bench/train_step.py --config base --batch-sizes 64,256 --precision fp32,tf32,bf16 --compile both  # GPU
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from vilbert.model import ViLBERTConfig, ViLBERTForPretraining, count_parameters


def git_commit() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            name = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), name)
    except OSError:
        pass
    return f"CPU {name} ({torch.get_num_threads()} threads)"


def make_batches(cfg: ViLBERTConfig, batch: int, seq_len: int, regions: int, device: torch.device, count: int,
                 seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """`count` synthetic pretraining batches (regions includes [IMG])."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.randint(min(1000, cfg.vocab_size // 2), cfg.vocab_size, (batch, seq_len), generator=g)
        lengths = torch.randint(seq_len // 2, seq_len + 1, (batch,), generator=g)
        attention_mask = (torch.arange(seq_len)[None] < lengths[:, None]).long()
        masked = (torch.rand(batch, seq_len, generator=g) < 0.15) & attention_mask.bool()
        masked[:, 0] = False
        labels = torch.where(masked, ids, torch.full_like(ids, -1))
        ids = torch.where(masked, torch.full_like(ids, min(103, cfg.vocab_size - 1)), ids)
        r = regions - 1
        image_label = torch.where(torch.rand(batch, r, generator=g) < 0.15, 1, -1)
        target = torch.softmax(torch.randn(batch, r, cfg.v_target_size, generator=g) * 3, -1)
        b = dict(input_ids=ids, token_type_ids=torch.zeros_like(ids), attention_mask=attention_mask,
                 image_feat=torch.rand(batch, regions, cfg.v_feature_size, generator=g),
                 image_loc=torch.rand(batch, regions, 5, generator=g),
                 image_attention_mask=torch.ones(batch, regions, dtype=torch.long),
                 masked_lm_labels=labels, image_label=image_label, image_target=target,
                 next_sentence_label=torch.randint(0, 2, (batch,), generator=g))
        out.append({k: v.to(device, non_blocking=True) for k, v in b.items()})
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_case(cfg: ViLBERTConfig, device: torch.device, batch: int, precision: str, compiled: bool, steps: int,
             warmup: int, seq_len: int, regions: int, dense_heads: bool) -> dict[str, object]:
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    torch.backends.cudnn.allow_tf32 = precision == "tf32"
    model = ViLBERTForPretraining(cfg, sparse_heads=not dense_heads).to(device).train()
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.01, fused=fused)
    step_fn = model
    if compiled:
        step_fn = torch.compile(model)
    batches = make_batches(cfg, batch, seq_len, regions, device, count=4)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def step(i: int) -> float:
        with autocast:
            loss = step_fn(**batches[i % len(batches)]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for i in range(warmup):
        loss = step(i)
    sync(device)
    warm_s = time.perf_counter() - t0
    # Median of per-step times: robust to other jobs on a shared machine (a sync per step costs ~nothing
    # next to a step of tens of milliseconds).
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        loss = step(i)
        sync(device)
        times.append(time.perf_counter() - t0)
    dt = statistics.median(times)
    if device.type == "cuda":
        peak = f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"
    else:
        peak = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB RSS (process max)"
    result = dict(batch=batch, precision=precision, compiled="yes" if compiled else "no",
                  ms=dt * 1e3, sps=batch / dt, peak=peak, loss=float(loss.detach()), warm_s=warm_s)
    del model, opt, step_fn, batches
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="base", help="named config (base, small, tiny) or a JSON config path")
    p.add_argument("--batch-sizes", default="64,256")
    p.add_argument("--precision", default="fp32,bf16", help="comma list of fp32, tf32, bf16")
    p.add_argument("--compile", choices=["off", "on", "both"], default="off", nargs="?", const="on")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--seq-len", type=int, default=36)
    p.add_argument("--regions", type=int, default=37, help="regions including [IMG]")
    p.add_argument("--dense-heads", action="store_true", help="MLM/region heads on every position (baseline)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)

    cfg = (ViLBERTConfig.from_json_file(args.config) if args.config.endswith(".json")
           else ViLBERTConfig.from_name(args.config))
    device = torch.device(args.device)
    with torch.device("meta"):
        n_params = count_parameters(ViLBERTForPretraining(cfg))
    compiles = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    print(f"# ViLBERT pretraining step: config {args.config} ({n_params:,} parameters), {args.seq_len} tokens, "
          f"{args.regions} regions, {'dense' if args.dense_heads else 'sparse'} heads, AdamW"
          f"{' (fused)' if device.type == 'cuda' else ''}")
    print(f"# device: {device_name(device)}; torch {torch.__version__}; commit {git_commit()}; "
          f"date {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; median of {args.steps} steps "
          f"after {args.warmup} warm-up; load average {os.getloadavg()[0]:.1f}")
    print("| batch | precision | compiled | ms/step (median) | samples/s | peak memory | warm-up s |")
    print("|---|---|---|---|---|---|---|")
    for bs in (int(b) for b in args.batch_sizes.split(",")):
        for prec in args.precision.split(","):
            for comp in compiles:
                try:
                    r = run_case(cfg, device, bs, prec, comp, args.steps, args.warmup, args.seq_len, args.regions,
                                 args.dense_heads)
                except torch.OutOfMemoryError:
                    print(f"| {bs} | {prec} | {'yes' if comp else 'no'} | OOM | | | |", flush=True)
                    continue
                print(f"| {r['batch']} | {r['precision']} | {r['compiled']} | {r['ms']:.1f} | {r['sps']:,.0f} | "
                      f"{r['peak']} | {r['warm_s']:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
