"""SFT stage: next-token loss on response tokens only (the prompt is masked out).

The SFT model is where the policy and the reference start (paper Sec. 5.3.3: PPO without an
SFT initialisation fails).
"""

from __future__ import annotations

import logging
import math
import random
from pathlib import Path
from typing import Any

import torch

from ppomax import functional as F
from ppomax.config import SFTConfig, check

logger = logging.getLogger("ppomax")


def split_eval(rows: list, eval_split: float, seed: int) -> tuple[list, list]:
    """Hold out ``eval_split`` of ``rows`` (seeded); at least one row stays for training."""
    if eval_split <= 0 or len(rows) < 2:
        return rows, []
    idx = list(range(len(rows)))
    random.Random(seed).shuffle(idx)
    n_eval = min(len(rows) - 1, max(1, int(round(eval_split * len(rows)))))
    held = set(idx[:n_eval])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def lm_loss(model, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
    """Token-mean NLL of the labelled (response) tokens; (B, L) labels with -100 elsewhere.

    The mean is over every response token of the global batch: ``batch["num_tokens"]`` is its
    token count (put there by ``loop.run_supervised``), so this returns the micro-batch's share
    and every token weighs the same however the batch is split. Without it: this batch's mean.
    """
    from ppomax.models import position_ids_from_mask

    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=position_ids_from_mask(batch["attention_mask"]), use_cache=False)
    nll, m = F.next_token_nll(out.logits, batch["labels"])  # (B, L-1)
    loss = F.masked_mean(nll, m, num_tokens=batch.get("num_tokens"))
    return loss, {"loss": loss.item()}


@torch.no_grad()
def eval_lm(model, examples: list, collate, batch_size: int) -> dict[str, float]:
    """Eval loss (token mean over all held-out response tokens) and perplexity = exp(loss)."""
    from ppomax.models import position_ids_from_mask

    if not examples:
        return {}
    device = next(model.parameters()).device
    model.eval()
    total, count = 0.0, 0.0
    for s in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[s : s + batch_size]).items()}
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    position_ids=position_ids_from_mask(batch["attention_mask"]), use_cache=False)
        nll, m = F.next_token_nll(out.logits, batch["labels"])
        total += (nll * m).sum().item()
        count += m.sum().item()
    loss = total / max(count, 1.0)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


def setup_processes(cfg):
    """The process group and this process's device (distributed.setup), first: a device this machine
    lacks, or more processes than GPUs, fails before any model loads. Returns the Dist."""
    from ppomax import distributed as dist_lib

    return dist_lib.setup(cfg.device)


def load_stage_data(cfg, kind: str, model=None, tokenizer=None) -> tuple[Any, list, list, dict]:
    """Shared by SFT and RM: check paths, load + validate rows (before any model is loaded),
    hold out eval rows, tokenize with length handling. Returns (tokenizer, train, eval, stats)."""
    from ppomax import data as D
    from ppomax import models as M
    from ppomax.errors import UserError

    name = type(cfg).__name__
    check(cfg.output_dir is not None, f"{name}.output_dir is required (flag --output_dir)")
    check(cfg.dataset is not None, f"{name}.dataset is required (flag --dataset)")
    check(model is not None or cfg.model_name_or_path is not None,
          f"{name}.model_name_or_path is required (flag --model_name_or_path)")
    if tokenizer is None:
        tokenizer = M.load_tokenizer(cfg.model_name_or_path, trust_remote_code=cfg.trust_remote_code)
    if cfg.push_to_hub:  # a missing login fails now, not after training (as transformers' Trainer)
        from ppomax.hub import create_repo

        create_repo(cfg.hub_model_id, cfg.hub_private_repo)
    rows, n_bad = D.load_rows(cfg.dataset, kind, skip_bad_rows=cfg.skip_bad_rows)
    if cfg.eval_dataset:
        eval_rows, n_bad_eval = D.load_rows(cfg.eval_dataset, kind, skip_bad_rows=cfg.skip_bad_rows)
        n_bad += n_bad_eval
    else:
        rows, eval_rows = split_eval(rows, cfg.eval_split, cfg.seed)
    tokenize = D.tokenize_sft if kind == "sft" else D.tokenize_preference
    args = (tokenizer, cfg.max_length, cfg.max_prompt_length, cfg.truncation_mode)
    train_ex, stats = tokenize(rows, *args)
    eval_ex = tokenize(eval_rows, *args)[0] if eval_rows else []  # eval_split = 0: no eval
    logger.info("%s data: %d train / %d eval examples; %d bad rows skipped; %s",
                kind, len(train_ex), len(eval_ex), n_bad, stats.as_dict())
    if not train_ex:
        raise UserError(f"no {kind} examples left after length filtering (max_length / max_prompt_length)")
    return tokenizer, train_ex, eval_ex, {**stats.as_dict(), "bad_rows": n_bad}


def train_sft(cfg: SFTConfig, model=None, tokenizer=None) -> dict[str, Any]:
    """Run SFT; the fine-tuned model and tokenizer are saved in ``cfg.output_dir``. A ``model`` passed
    in is trained in place on ``cfg.device`` (moved there with ``Module.to``)."""
    from ppomax import data as D
    from ppomax import models as M
    from ppomax import publish
    from ppomax.hf_args import load_dtype
    from ppomax.loop import run_supervised
    from ppomax.training import seed_run

    setup_processes(cfg)
    tokenizer, train_ex, eval_ex, stats = load_stage_data(cfg, "sft", model, tokenizer)
    if model is None:
        model = M.load_causal_lm(cfg.model_name_or_path, load_dtype(cfg, True, cfg.use_peft), cfg.trust_remote_code,
                                 cfg.attn_implementation)
    # Seeded before the adapters are added: peft draws LoRA's A matrices at random, so a later seed
    # left two runs with one seed on different adapters. (After the load, as before: a full
    # fine-tune's random stream is the same as it was.)
    seed_run(cfg.seed, cfg.full_determinism)
    if cfg.use_peft:
        model = M.apply_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules)
    pad = tokenizer.pad_token_id

    def collate(ex):
        return D.collate_sft(ex, pad)

    def save_model(m, out: Path) -> None:  # the final model, in --torch_dtype (ppomax/publish.py)
        if M.is_peft_model(m) and cfg.save_merged:  # LoRA: keep the adapters, and write merged weights
            m.save_pretrained(out / "adapter")
            m = m.merge_and_unload()
        m, state = publish.unwrap_gathered(m)  # a sharded model's weights, gathered on rank 0
        publish.save_final(m, out, tokenizer, publish.save_dtype(cfg.torch_dtype,
                           cfg.model_name_or_path), merged=cfg.save_merged, state=state)
        publish.push(cfg, out, "sft")

    rows_logged = run_supervised(
        cfg, "sft", model, tokenizer, train_ex, collate, lm_loss,
        lambda m: eval_lm(m, eval_ex, collate, cfg.per_device_eval_batch_size), save_model,
    )
    final = {k: v for k, v in (rows_logged[-1] if rows_logged else {}).items() if k.startswith("eval/")}
    if M.is_peft_model(model) and cfg.save_merged:
        model = model.get_base_model()  # the adapters were merged into it by save_model
    return {"model": model, "metrics": rows_logged, "final": final, "data_stats": stats}
