"""Reward-model stage (paper Sec. 4, Eq. 2).

loss = −mean log σ(r(x, y_w) − r(x, y_l)) + β_rm · NLL_LM(y_w | x); the score is the scalar
head at the last token of the response (EOS). Reports pairwise accuracy = mean[r_w > r_l];
the paper warns that accuracy alone does not say whether the RM is good for PPO.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from ppomax import functional as F
from ppomax.config import RewardConfig, check

logger = logging.getLogger("ppomax")


def pair_scores(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(r_chosen (B,), r_rejected (B,), last hidden states (2B, L, H)) for a preference batch."""
    from ppomax.models import position_ids_from_mask

    hidden = model.hidden_states(batch["input_ids"], batch["attention_mask"],
                                 position_ids_from_mask(batch["attention_mask"]))
    scores = model.score_hidden(hidden)  # (2B, L)
    r = scores[torch.arange(scores.shape[0], device=scores.device), batch["last_index"]]
    B = r.shape[0] // 2
    return r[:B], r[B:], hidden


def pair_units(batch: dict) -> dict[str, torch.Tensor]:
    """Normalisers of a preference micro-batch (``loop.run_supervised`` sums them over the global
    batch): its pairs, and the labelled tokens of its chosen responses (the first B rows)."""
    B = batch["input_ids"].shape[0] // 2
    return {"num_pairs": batch["input_ids"].new_tensor(B), "num_tokens": (batch["labels"][:B, 1:] != -100).sum()}


def make_rm_loss(rm_lm_coef: float, lm_head=None):
    def loss_fn(model, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        rc, rr, hidden = pair_scores(model, batch)
        B = rc.shape[0]
        # Units, so that the loss does not depend on how a batch is split into micro-batches and
        # ranks: the Bradley-Terry term is a mean over pairs (Eq. 2's expectation over
        # (x, y_w, y_l); a pair is one comparison whatever its length), the LM term a mean over
        # chosen-response tokens, as in SFT. The global batch's counts come in the batch
        # (pair_units); this returns the micro-batch's share, its stats too.
        share = B / float(batch.get("num_pairs", B))
        loss = F.pairwise_loss(rc, rr) * share
        stats = {"pair_loss": loss.item(), "accuracy": (rc > rr).float().mean().item() * share}
        if rm_lm_coef > 0:
            # LM term on the chosen responses only (the first B rows)
            # through the model's own method when it has the head: a sharded model gathers it there
            logits = model.lm_logits(hidden[:B]) if hasattr(model, "lm_head_for_training") else lm_head(hidden[:B])
            lm = F.masked_mean(*F.next_token_nll(logits, batch["labels"][:B]), num_tokens=batch.get("num_tokens"))
            loss = loss + rm_lm_coef * lm
            stats["lm_loss"] = lm.item()
        stats["loss"] = loss.item()
        return loss, stats

    return loss_fn


@torch.no_grad()
def eval_rm(model, examples: list, collate, batch_size: int) -> dict[str, float]:
    """Pairwise loss, accuracy and mean margin r_w − r_l on held-out pairs."""
    if not examples:
        return {}
    device = next(model.parameters()).device
    model.eval()
    rcs, rrs = [], []
    for s in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[s : s + batch_size]).items()}
        rc, rr, _ = pair_scores(model, batch)
        rcs.append(rc.float())
        rrs.append(rr.float())
    rc, rr = torch.cat(rcs), torch.cat(rrs)
    return {"loss": F.pairwise_loss(rc, rr).item(), "accuracy": (rc > rr).float().mean().item(),
            "margin": (rc - rr).mean().item()}


def train_reward_model(cfg: RewardConfig, model=None, tokenizer=None) -> dict[str, Any]:
    """Train a scalar-head reward model from ``model_name_or_path`` (usually the SFT model). A ``model``
    passed in is trained in place on ``cfg.device`` (moved there with ``Module.to``)."""
    from ppomax import data as D
    from ppomax import models as M
    from ppomax import publish
    from ppomax.hf_args import load_dtype
    from ppomax.loop import run_supervised
    from ppomax.sft import load_stage_data, setup_processes
    from ppomax.training import seed_run

    setup_processes(cfg)
    tokenizer, train_ex, eval_ex, stats = load_stage_data(cfg, "preference", model, tokenizer)
    seed_run(cfg.seed, cfg.full_determinism)
    lm_head = None
    load = (load_dtype(cfg, True, cfg.use_peft), cfg.trust_remote_code, cfg.attn_implementation)
    if model is None:
        if cfg.rm_lm_coef > 0:
            # The LM term needs the SFT model's LM head on the RM's backbone (shared weights).
            causal = M.load_causal_lm(cfg.model_name_or_path, *load)
            model = M.ScalarHeadModel.from_causal_lm_model(causal)
            lm_head = causal.get_output_embeddings()
            model.lm_head_for_training = lm_head  # registered as a submodule so it trains too
        else:
            model = M.ScalarHeadModel.from_causal_lm(cfg.model_name_or_path, *load)
    elif cfg.rm_lm_coef > 0:
        lm_head = getattr(model, "lm_head_for_training", None)
        check(lm_head is not None, "rm_lm_coef > 0 with a given model needs model.lm_head_for_training")
    if cfg.use_peft:  # LoRA on the backbone; the scalar head (and an LM head for β_rm) trains fully
        model = M.apply_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules)
    pad = tokenizer.pad_token_id

    def collate(ex):
        return D.collate_preference(ex, pad)

    def save_model(m, out: Path) -> None:
        if M.is_peft_model(getattr(m, "backbone", None)):
            # keep the adapters, and write the merged model: PPO loads a plain scalar-head RM / critic init
            m.backbone.save_pretrained(out / "adapter")
            m.backbone = m.backbone.merge_and_unload()
        m, state = publish.unwrap_gathered(m)  # a sharded model's weights, gathered on rank 0
        publish.save_final(m, out, tokenizer, publish.save_dtype(cfg.torch_dtype,
                           cfg.model_name_or_path), state=state)  # in --torch_dtype; the head stays fp32
        publish.push(cfg, out, "rm")

    rows_logged = run_supervised(
        cfg, "rm", model, tokenizer, train_ex, collate, make_rm_loss(cfg.rm_lm_coef, lm_head),
        lambda m: eval_rm(m, eval_ex, collate, cfg.per_device_eval_batch_size), save_model, units=pair_units,
    )
    final = {k: v for k, v in (rows_logged[-1] if rows_logged else {}).items() if k.startswith("eval/")}
    return {"model": model, "metrics": rows_logged, "final": final, "data_stats": stats}
