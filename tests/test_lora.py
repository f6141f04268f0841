"""LoRA through peft: π_ref = the policy with its adapters disabled, adapter-only training, resume, merge.

Tiny random Llama models built in the test; peft is the optional extra ``ppomax[peft]``.
"""

from __future__ import annotations

import dataclasses
import gc

import pytest
import torch

pytest.importorskip("peft", reason="LoRA needs the optional extra: pip install 'ppomax[peft]'")

from ppomax import models as M  # noqa: E402
from ppomax.config import ConfigError, PPOConfig, SFTConfig  # noqa: E402
from ppomax.ppo.rollout import response_logprobs  # noqa: E402
from ppomax.ppo.trainer import PPOTrainer  # noqa: E402

PROMPTS = ["hello there", "the cat sat", "a dog ran", "say words"]
EXACT = torch.cuda.is_available()  # bit-exact comparisons hold on a GPU under --full_determinism (on CPU always)


def n_words(prompts, responses):
    return [float(len(r.split())) for r in responses]



@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return M.build_tiny_model(tmp_path_factory.mktemp("lora") / "tiny", num_layers=2, hidden_size=32, num_heads=2)


def ppo_config(tiny: str, out, **kw) -> PPOConfig:
    values = dict(
        model_name_or_path=tiny, output_dir=str(out), critic_init="sft", max_steps=1, critic_pretrain_steps=0,
        rollout_batch_size=4, num_mini_batches=2, per_device_train_batch_size=2, response_length=6,
        report_to="none", disable_tqdm=True, learning_rate=1e-2, critic_learning_rate=1e-2, use_peft=True,
        seed=3,
    )
    values.update(kw)
    return PPOConfig.from_preset("ppo_max", **values)


def fixed_parts(trainer: PPOTrainer):
    """A fixed [prompt | response] batch (B=2, P=3, T=4) for comparing log-probs, on the trainer's device."""
    g = torch.Generator().manual_seed(0)
    p_ids = torch.randint(3, 200, (2, 3), generator=g)
    resp = torch.randint(3, 200, (2, 4), generator=g)
    p_mask = torch.ones(2, 3, dtype=torch.long)
    mask = torch.tensor([[1.0, 1, 1, 1], [1, 1, 0, 0]])
    return tuple(x.to(trainer.device) for x in (p_ids, p_mask, resp, mask))


def randomize_lora(model) -> None:
    """LoRA B starts at zero (adapters = identity); give it values so the adapters matter."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))


def lora_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def test_reference_is_the_base_model_with_adapters_disabled(tiny, tmp_path):
    trainer = PPOTrainer(ppo_config(tiny, tmp_path / "run"), prompts=PROMPTS, reward_fn=n_words)
    assert trainer.ref_policy is None
    randomize_lora(trainer.policy)
    base = M.load_causal_lm(tiny).eval().to(trainer.device)
    parts = fixed_parts(trainer)
    with torch.no_grad():
        ref = trainer.forwards.ref_logprobs(parts)
        expect = response_logprobs(base, parts, trainer.cfg.temperature)
        adapted = response_logprobs(trainer.policy, parts, trainer.cfg.temperature)
    assert torch.equal(ref, expect)  # exactly the base model's log-probs
    assert not torch.allclose(adapted, expect, atol=1e-3)  # the adapters are back on afterwards


def test_ppo_step_trains_only_lora_and_keeps_the_reference(tiny, tmp_path):
    cfg = ppo_config(tiny, tmp_path / "run", critic_use_peft=True)
    trainer = PPOTrainer(cfg, prompts=PROMPTS, reward_fn=n_words)
    parts = fixed_parts(trainer)
    before = {n: p.detach().clone() for n, p in trainer.policy.named_parameters()}
    critic_before = {n: p.detach().clone() for n, p in trainer.critic.named_parameters()}
    with torch.no_grad():
        ref_before = trainer.forwards.ref_logprobs(parts)
    trainer.train()
    changed = {n for n, p in trainer.policy.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed), sorted(changed)[:5]
    assert any("lora_B" in n for n in changed)
    critic_changed = {n for n, p in trainer.critic.named_parameters() if not torch.equal(p, critic_before[n])}
    assert critic_changed and all("lora_" in n or n.startswith("v_head") for n in critic_changed)
    assert any(n.startswith("v_head") for n in critic_changed)
    # only adapter (and value-head) parameters are in the optimizers
    opt_params = {id(p) for g in trainer.policy_opt.param_groups for p in g["params"]}
    assert opt_params == {id(p) for n, p in trainer.policy.named_parameters() if "lora_" in n}
    with torch.no_grad():
        assert torch.equal(trainer.forwards.ref_logprobs(parts), ref_before)


def _param_bytes(*models) -> int:
    seen, total = set(), 0
    for m in models:
        if m is None:
            continue
        for p in m.parameters():
            if p.data_ptr() not in seen:
                seen.add(p.data_ptr())
                total += p.numel() * p.element_size()
    return total


def test_no_second_policy_copy(tiny, tmp_path):
    from transformers import LlamaForCausalLM

    def live_causal_lms() -> int:
        gc.collect()
        return sum(type(o) is LlamaForCausalLM for o in gc.get_objects())

    n0 = live_causal_lms()
    lora = PPOTrainer(ppo_config(tiny, tmp_path / "a"), prompts=PROMPTS, reward_fn=n_words)
    assert lora.ref_policy is None
    assert live_causal_lms() - n0 == 1  # the policy only (the critic is a backbone + head)
    full = PPOTrainer(ppo_config(tiny, tmp_path / "b", use_peft=False), prompts=PROMPTS, reward_fn=n_words)
    assert full.ref_policy is not None
    policy_bytes = _param_bytes(full.policy)
    saved = _param_bytes(full.policy, full.ref_policy, full.critic) - _param_bytes(lora.policy, lora.ref_policy, lora.critic)
    lora_bytes = sum(p.numel() * p.element_size() for n, p in lora.policy.named_parameters() if "lora_" in n)
    assert saved == policy_bytes - lora_bytes  # exactly one policy copy, minus the adapters


def test_resume_restores_adapter_weights(tiny, tmp_path):
    cfg = ppo_config(tiny, tmp_path / "run", critic_use_peft=True, max_steps=2, save_steps=1)
    first = PPOTrainer(cfg, prompts=PROMPTS, reward_fn=n_words)
    first.train()
    files = {p.name for p in (tmp_path / "run" / "checkpoint-1" / "policy").iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json"} <= files and "model.safetensors" not in files
    resumed = PPOTrainer(dataclasses.replace(cfg, max_steps=1, resume_from=str(tmp_path / "run" / "checkpoint-1")),
                         prompts=PROMPTS, reward_fn=n_words)
    fresh = lora_state(resumed.policy)
    resumed.load_checkpoint(tmp_path / "run" / "checkpoint-2")
    loaded = lora_state(resumed.policy)
    trained = lora_state(first.policy)
    assert loaded.keys() == trained.keys()
    assert all(torch.equal(loaded[k], trained[k]) for k in trained)
    assert any(not torch.equal(fresh[k], trained[k]) for k in trained)
    for n, p in first.critic.named_parameters():
        if "lora_" in n or n.startswith("v_head"):
            assert torch.equal(dict(resumed.critic.named_parameters())[n], p), n


def test_merge_gives_the_adapter_models_logits(tiny, tmp_path):
    trainer = PPOTrainer(ppo_config(tiny, tmp_path / "run"), prompts=PROMPTS, reward_fn=n_words)
    randomize_lora(trainer.policy)
    ckpt = trainer.save()
    out = M.merge_lora(ckpt / "policy", tiny, tmp_path / "merged")
    merged = M.load_causal_lm(out).eval().to(trainer.device)
    assert not M.is_peft_model(merged)
    ids = torch.randint(3, 200, (2, 7), generator=torch.Generator().manual_seed(2)).to(trainer.device)
    with torch.no_grad():
        expect = trainer.policy.eval()(input_ids=ids).logits
        got = merged(input_ids=ids).logits
        auto = M.load_causal_lm(ckpt / "policy").eval().to(trainer.device)(input_ids=ids).logits  # merged on load
    torch.testing.assert_close(got, expect, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(auto, expect, atol=1e-5, rtol=1e-5)
    assert M.load_tokenizer(out).chat_template is not None


def test_merge_refuses_a_full_model(tiny, tmp_path):
    with pytest.raises(M.ModelFormatError, match="not a LoRA adapter directory"):
        M.merge_lora(tiny, None, tmp_path / "x")


def test_export_cli(tiny, tmp_path):
    from ppomax.cli import main

    trainer = PPOTrainer(ppo_config(tiny, tmp_path / "run"), prompts=PROMPTS, reward_fn=n_words)
    ckpt = trainer.save()
    assert main(["export", "--checkpoint", str(ckpt / "policy"), "--output_dir", str(tmp_path / "exp")]) == 0
    assert (tmp_path / "exp" / "model.safetensors").exists()


def test_lora_config_validation():
    with pytest.raises(ConfigError, match="lora_target_modules"):
        PPOConfig(lora_target_modules=" , ")
    with pytest.raises(ConfigError, match="lora_r"):
        SFTConfig(lora_r=0)


def test_sft_with_lora_writes_merged_model_and_adapter(tiny, tmp_path):
    from ppomax.sft import train_sft

    rows = [{"prompt": "say", "response": "the cat"}] * 8
    from ppomax.data import write_jsonl

    write_jsonl(tmp_path / "sft.jsonl", rows)
    res = train_sft(SFTConfig(model_name_or_path=tiny, dataset=str(tmp_path / "sft.jsonl"), output_dir=str(tmp_path / "sft"),
                              max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2, report_to="none",
                              disable_tqdm=True, eval_split=0.0, use_peft=True, save_steps=1))
    assert (tmp_path / "sft" / "adapter" / "adapter_model.safetensors").exists()
    model = M.load_causal_lm(tmp_path / "sft")
    base = M.load_causal_lm(tiny)
    diff = {n for n, p in model.named_parameters() if not torch.equal(p, dict(base.named_parameters())[n])}
    assert diff and all(n.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight")) for n in diff)
    assert not M.is_peft_model(res["model"])


def test_sft_with_lora_is_reproducible_from_its_seed(tiny, tmp_path):
    """LoRA's A matrices are drawn at random when the adapters are added: the run's seed must come
    first, or two runs with one seed start from different adapters (and train to different weights)."""
    from ppomax.data import write_jsonl
    from ppomax.sft import train_sft

    write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "say", "response": "the cat"}] * 8)

    def run(name: str, seed: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(1000 + len(name))  # a different global RNG state before each run
        train_sft(SFTConfig(model_name_or_path=tiny, dataset=str(tmp_path / "sft.jsonl"), output_dir=str(tmp_path / name),
                            max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2, report_to="none",
                            disable_tqdm=True, eval_split=0.0, use_peft=True, seed=seed))
        return {n: p.detach().cpu() for n, p in M.load_causal_lm(tmp_path / name).named_parameters()}

    a, b, other = run("a", 5), run("bb", 5), run("ccc", 6)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.equal(a[n], other[n]) for n in a)  # the seed does reach the adapters


def test_lora_with_gradient_checkpointing_and_bf16_autocast(tiny, tmp_path):
    cfg = ppo_config(tiny, tmp_path / "run", critic_use_peft=True, gradient_checkpointing=True, bf16=True)
    trainer = PPOTrainer(cfg, prompts=PROMPTS, reward_fn=n_words)
    before = lora_state(trainer.policy)
    rows = trainer.train()
    assert rows[-1]["grad_norm/policy"] > 0
    after = lora_state(trainer.policy)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(p.dtype == torch.float32 for p in trainer.policy.parameters())  # master weights stay fp32


def test_reward_model_with_lora_saves_a_merged_scalar_head_model(tiny, tmp_path):
    """`ppomax rm --use_peft` (issue #13: an RM step cheaper than a full fine-tune): only LoRA and the
    head train; the output directory holds the adapters and a merged model that PPO loads as is."""
    from ppomax.config import RewardConfig
    from ppomax.data import write_jsonl
    from ppomax.reward import train_reward_model

    rows = [{"prompt": p, "chosen": " the cat sat", "rejected": " a dog ran"} for p in PROMPTS] * 4
    write_jsonl(tmp_path / "pref.jsonl", rows)
    out = tmp_path / "rm"
    res = train_reward_model(RewardConfig(
        model_name_or_path=tiny, dataset=str(tmp_path / "pref.jsonl"), output_dir=str(out), max_steps=12,
        per_device_train_batch_size=8, learning_rate=2e-2, eval_split=0.0, report_to="none", disable_tqdm=True,
        warmup_ratio=0.0, use_peft=True, lora_r=4, save_steps=6, full_determinism=EXACT))
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    assert res["metrics"][-1]["train/accuracy"] == 1.0
    reloaded = M.ScalarHeadModel.from_pretrained(out).eval()  # a plain (merged) scalar-head model, on the CPU
    assert not M.is_peft_model(reloaded.backbone) and not M.is_peft_model(res["model"].backbone)
    base = M.ScalarHeadModel.from_causal_lm(tiny)
    changed = {n for n, p in reloaded.backbone.named_parameters()
               if not torch.equal(p, dict(base.backbone.named_parameters())[n])}
    assert changed and all(n.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight"))
                           for n in changed)  # the base moved only by the merged LoRA deltas
    tok = M.load_tokenizer(out)
    device = next(res["model"].parameters()).device  # the trained model stays on the stage's device
    enc = tok([" the cat sat", " a dog ran"], padding=True, return_tensors="pt").to(device)
    with torch.no_grad():
        a = res["model"].eval()(enc["input_ids"], enc["attention_mask"])
        b = reloaded.to(device)(enc["input_ids"], enc["attention_mask"])
    assert torch.equal(a, b)
    # resume from the step-6 checkpoint (adapters + head + AdamW state) ends bit-identical
    import shutil

    crashed = tmp_path / "crashed"
    crashed.mkdir()
    shutil.copytree(out / "checkpoint-6", crashed / "checkpoint-6")
    shutil.copy(out / "config.yaml", crashed / "config.yaml")
    resumed = train_reward_model(RewardConfig(
        model_name_or_path=tiny, dataset=str(tmp_path / "pref.jsonl"), output_dir=str(crashed), max_steps=12,
        per_device_train_batch_size=8, learning_rate=2e-2, eval_split=0.0, report_to="none", disable_tqdm=True,
        warmup_ratio=0.0, use_peft=True, lora_r=4, save_steps=6, resume_from=str(crashed / "checkpoint-6"),
        full_determinism=EXACT))
    for name, p in res["model"].state_dict().items():
        assert torch.equal(p, resumed["model"].state_dict()[name]), name


def test_reward_config_checks_its_lora_fields():
    from ppomax.config import RewardConfig

    with pytest.raises(ConfigError, match="lora_target_modules"):
        RewardConfig(model_name_or_path="x", use_peft=True, lora_target_modules=" , ")


# ---------------------------------------------------------------------------------------------
# The vLLM engine's weight sync for user-supplied peft policies (issue 21 item 9): what it pushes is
# computed without vLLM (engines.vllm.merged_weights), so it is checked here on CPU.
# ---------------------------------------------------------------------------------------------

PEFT_CASES = {
    # the lm_head copy in modules_to_save is what the forward uses (before: dropped, the frozen original pushed
    # under the name 'lm_head.original_module.weight')
    "lora_modules_to_save": dict(target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]),
    # DoRA: W' = m / ‖W + ΔW‖ · (W + ΔW) (before: the magnitudes were ignored, W + ΔW pushed)
    "dora": dict(target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True),
    # LoRA on the embedding keeps its adapters in lora_embedding_A/B (before: skipped, W pushed)
    "lora_embedding": dict(target_modules=["embed_tokens", "q_proj"]),
}


@pytest.fixture(scope="module")
def untied(tiny, tmp_path_factory) -> str:
    """tiny with its own lm_head (tie_word_embeddings false): adapting one embedding is then representable."""
    model = M.load_causal_lm(tiny)
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach() * 1.5)
    out = tmp_path_factory.mktemp("untied")
    model.save_pretrained(out)
    assert not M.load_causal_lm(out).config.tie_word_embeddings
    return str(out)


def _user_peft_policy(model_dir, case):
    """A user-built peft policy whose adapters, DoRA magnitudes and modules_to_save copy all differ from the
    base weights (as after training)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    policy = get_peft_model(M.load_causal_lm(model_dir), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                               init_lora_weights=False, **PEFT_CASES[case]))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_magnitude_vector" in name or "modules_to_save" in name:
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g))
    return policy.eval()


@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_vllm_sync_pushes_the_weights_the_peft_forward_uses(tiny, untied, case):
    import copy

    from ppomax.engines.vllm import merged_weights

    tiny = tiny if case == "dora" else untied  # adapting one of two tied embeddings is refused (below)
    policy = _user_peft_policy(tiny, case)
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    pushed = dict(merged_weights(policy))
    assert all(torch.equal(p, before[n]) for n, p in policy.named_parameters())  # the policy is not touched
    # the pushed tensors are a plain model's whole state dict, under its names ...
    plain = M.load_causal_lm(tiny)
    assert set(pushed) == set(plain.state_dict()), sorted(set(pushed) ^ set(plain.state_dict()))[:4]
    plain.load_state_dict(pushed)
    # ... equal to peft's own merge ...
    reference = copy.deepcopy(policy).merge_and_unload().state_dict()
    for k, v in reference.items():
        torch.testing.assert_close(pushed[k], v, rtol=0, atol=1e-6, msg=k)
    # ... and giving the peft policy's logits: what vLLM then serves is what PPO trains
    ids = torch.randint(3, 200, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = policy(input_ids=ids).logits, plain(input_ids=ids).logits
        base = M.load_causal_lm(tiny)(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert (want - base).abs().max() > 1e-2  # the adapters matter: the check above has teeth


@pytest.mark.parametrize("kind", ["ia3", "dora_embedding", "tied_modules_to_save", "tied_lora_embedding"])
def test_vllm_sync_refuses_a_peft_policy_it_cannot_merge(tiny, kind):
    from peft import IA3Config, LoraConfig, get_peft_model

    from ppomax.engines.vllm import check_syncable, merged_weights
    from ppomax.errors import UserError

    if kind == "ia3":
        cfg, match = IA3Config(target_modules=["v_proj", "down_proj"], feedforward_modules=["down_proj"]), \
            r"module '.*v_proj' is a Linear adapter \(only LoRA and DoRA are merged for vLLM\).*--rollout_engine hf"
    elif kind == "dora_embedding":
        cfg, match = LoraConfig(target_modules=["embed_tokens"], use_dora=True), \
            r"module 'model.embed_tokens' is a LoRA variant DoraEmbeddingVariant"
    else:  # the model ties lm_head to embed_tokens; the forward would use two different matrices
        cfg = (LoraConfig(target_modules=["q_proj"], modules_to_save=["lm_head"]) if kind == "tied_modules_to_save"
               else LoraConfig(target_modules=["embed_tokens"]))
        match = r"ties its input and output embeddings .* but its adapter changes '(lm_head|model.embed_tokens)'"
    policy = get_peft_model(M.load_causal_lm(tiny), cfg)
    with pytest.raises(UserError, match=match):
        check_syncable(policy)  # the engine calls it before vLLM starts
    with pytest.raises(UserError, match=match):  # before the fix: IA3 pushed unscaled, DoRA magnitudes ignored
        merged_weights(policy)
