"""One copy of the frozen weights shared between PPO's models (ppomax.shared_weights, issue #13)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("peft", reason="LoRA needs the optional extra: pip install 'ppomax[peft]'")

from ppomax import models as M  # noqa: E402
from ppomax.config import PPOConfig  # noqa: E402
from ppomax.ppo.trainer import PPOTrainer  # noqa: E402
from ppomax.shared_weights import canonical_name, share_frozen_weights, unique_parameter_bytes  # noqa: E402

PROMPTS = ["hello there", "the cat sat", "a dog ran", "say words"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return M.build_tiny_model(tmp_path_factory.mktemp("share") / "tiny", num_layers=2, hidden_size=32, num_heads=2)


@pytest.fixture(scope="module")
def lora_rm(tiny, tmp_path_factory) -> str:
    """A reward model 'trained' with LoRA on q/k/v/o and merged: only those projections differ from the base."""
    d = tmp_path_factory.mktemp("share") / "rm"
    rm = M.apply_lora(M.ScalarHeadModel.from_causal_lm(tiny), 4, 8.0, 0.0, "q_proj,k_proj,v_proj,o_proj")
    with torch.no_grad():
        for n, p in rm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
    M.ScalarHeadModel(rm.backbone.merge_and_unload(), rm.v_head).save_pretrained(d)
    return str(d)


def config(tiny, out, **kw) -> PPOConfig:
    values = dict(model_name_or_path=tiny, output_dir=str(out), max_steps=1, critic_pretrain_steps=0,
                  rollout_batch_size=4, num_mini_batches=2, per_device_train_batch_size=2, response_length=6,
                  report_to="none", disable_tqdm=True, learning_rate=1e-2, critic_learning_rate=1e-2, seed=3,
                  use_peft=True, critic_use_peft=True)
    values.update(kw)
    return PPOConfig.from_preset("ppo_max", **values)


def n_words(prompts, responses):
    return [float(len(r.split())) for r in responses]


def test_canonical_names():
    assert canonical_name("base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight") == \
        "layers.0.self_attn.q_proj.weight"  # a LoRA causal LM
    assert canonical_name("base_model.model.backbone.layers.1.mlp.up_proj.weight") == "layers.1.mlp.up_proj.weight"
    assert canonical_name("backbone.embed_tokens.weight") == canonical_name("model.embed_tokens.weight") == \
        "embed_tokens.weight"
    assert canonical_name("v_head.weight") == "v_head.weight"


def test_lora_critic_on_the_sft_base_holds_no_copy_of_it(tiny, tmp_path):
    t = PPOTrainer(config(tiny, tmp_path / "a", critic_init="sft"), prompts=PROMPTS, reward_fn=n_words)
    pol = {canonical_name(n): p for n, p in t.policy.named_parameters() if not p.requires_grad}
    frozen = [(n, p) for n, p in t.critic.named_parameters() if not p.requires_grad]
    assert frozen and all(p.data_ptr() == pol[canonical_name(n)].data_ptr() for n, p in frozen)  # all of its base
    assert all(p.data_ptr() not in {q.data_ptr() for q in t.policy.parameters()}
               for p in t.critic.parameters() if p.requires_grad)  # its adapters and head are its own
    base_bytes = sum(p.numel() * p.element_size() for _, p in frozen)
    trained = sum(p.numel() * p.element_size() for p in t.critic.parameters() if p.requires_grad)
    off = PPOTrainer(config(tiny, tmp_path / "b", critic_init="sft", share_frozen_weights=False), prompts=PROMPTS,
                     reward_fn=n_words)
    assert unique_parameter_bytes([off.policy, off.critic]) - unique_parameter_bytes([t.policy, t.critic]) == base_bytes
    assert unique_parameter_bytes([t.policy, t.critic]) == unique_parameter_bytes([t.policy]) + trained


def test_merged_lora_reward_model_shares_what_lora_left_alone(tiny, lora_rm, tmp_path):
    t = PPOTrainer(config(tiny, tmp_path / "a", reward_model_path=lora_rm), prompts=PROMPTS)
    pol = {canonical_name(n): p.data_ptr() for n, p in t.policy.named_parameters() if not p.requires_grad}
    shared = {canonical_name(n) for n, p in t.reward_model.named_parameters() if pol.get(canonical_name(n)) == p.data_ptr()}
    rm_names = {canonical_name(n) for n, _ in t.reward_model.named_parameters()}
    adapted = {n for n in rm_names if n.split(".")[-2] in ("q_proj", "k_proj", "v_proj", "o_proj")}
    assert adapted and shared == rm_names - adapted - {"v_head.weight", "v_head.bias"}  # MLPs, norms, embeddings
    # the critic starts as the RM (Sec. 5.3.3); its frozen base is the RM's: shared with the RM and the policy
    for n, p in t.critic.named_parameters():
        if not p.requires_grad:
            rm_p = dict(t.reward_model.named_parameters())[n.replace("base_model.model.", "").replace(".base_layer", "")]
            assert p.data_ptr() == rm_p.data_ptr(), n


def test_sharing_changes_no_number(tiny, lora_rm, tmp_path):
    runs = {}
    for share in (True, False):
        t = PPOTrainer(config(tiny, tmp_path / str(share), reward_model_path=lora_rm, max_steps=2,
                              share_frozen_weights=share, full_determinism=torch.cuda.is_available()),
                       prompts=PROMPTS)  # two runs compared bit for bit: on a GPU, deterministic kernels
        t.train()
        runs[share] = {f"{role}.{n}": p.detach().clone() for role, m in (("policy", t.policy), ("critic", t.critic))
                       for n, p in m.named_parameters()}
    assert runs[True].keys() == runs[False].keys()
    assert all(torch.equal(runs[True][k], runs[False][k]) for k in runs[True])
    assert any("lora_B" in k and runs[True][k].abs().sum() > 0 for k in runs[True])  # it did train


def test_only_bit_equal_frozen_tensors_are_shared():
    a, b, c = (torch.nn.Linear(3, 2) for _ in range(3))
    b.load_state_dict(a.state_dict())
    c.load_state_dict(a.state_dict())
    for m in (a, b):
        m.requires_grad_(False)
    c.weight.requires_grad_(False)  # c.bias stays trainable
    with torch.no_grad():
        b.bias.add_(1e-7)  # not bit-equal any more
    done = share_frozen_weights([a, b, c])
    assert b.weight.data_ptr() == a.weight.data_ptr() and b.bias.data_ptr() != a.bias.data_ptr()
    assert c.weight.data_ptr() == a.weight.data_ptr() and c.bias.data_ptr() != a.bias.data_ptr()
    assert dataclasses.astuple(done) == (2, 2 * 6 * 4)
    assert share_frozen_weights([a, b, c]).tensors == 0  # already shared


def test_own_the_rest_copies_only_what_a_sharing_model_kept():
    a, b, c = (torch.nn.Linear(3, 2) for _ in range(3))
    b.weight.data.copy_(a.weight.data)  # b shares its weight with a, keeps its own bias
    for m in (a, b, c):
        m.requires_grad_(False)
    before = {n: (p.data_ptr(), p.detach().clone()) for n, p in
              [("a.bias", a.bias), ("b.bias", b.bias), ("c.weight", c.weight)]}
    share_frozen_weights([a, b, c], own_the_rest=True)
    assert b.weight.data_ptr() == a.weight.data_ptr()
    assert b.bias.data_ptr() != before["b.bias"][0] and torch.equal(b.bias, before["b.bias"][1])  # copied
    assert a.bias.data_ptr() == before["a.bias"][0]  # a gave nothing up: untouched
    assert c.weight.data_ptr() == before["c.weight"][0]  # c shared nothing: untouched
