"""Porting from TRL / OpenRLHF (issue 23): seq-cls reward models both ways, Hub ids, dtypes per role,
the final model in output_dir and --push_to_hub."""

import json
import os
import shutil

import pytest
import torch

from ppomax.config import ConfigError, PPOConfig, SFTConfig
from ppomax.models import (
    ScalarHeadModel,
    build_tiny_model,
    is_adapter_dir,
    load_causal_lm,
    load_tokenizer,
)
from ppomax.ppo.rollout import reward_model_scores

peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "sft", num_layers=1, hidden_size=32, num_heads=2)


@pytest.fixture(scope="module")
def seqcls_rm(tiny, tmp_path_factory):
    """A reward model as TRL's RewardTrainer writes it: LlamaForSequenceClassification, num_labels=1, with
    the tiny model's base weights and a random score head, saved with its tokenizer."""
    from transformers import AutoModelForSequenceClassification

    out = tmp_path_factory.mktemp("seqcls") / "rm"
    torch.manual_seed(1)
    model = AutoModelForSequenceClassification.from_pretrained(tiny, num_labels=1)
    torch.nn.init.normal_(model.score.weight, std=0.5)
    model.save_pretrained(out)
    load_tokenizer(tiny).save_pretrained(out)
    return str(out)


def _ppo(tiny, out, **kw):
    base = dict(model_name_or_path=tiny, output_dir=str(out), max_steps=1, critic_pretrain_steps=0,
                rollout_batch_size=4, num_mini_batches=2, per_device_train_batch_size=2, response_length=4,
                report_to="none", disable_tqdm=True, num_sample_generations=0, learning_rate=1e-3, seed=0)
    return PPOConfig.from_preset("ppo_max", **{**base, **kw})


PROMPTS = ["the cat sat", "a dog ran far", "hello there", "one two three"]


# ---- 1. AutoModelForSequenceClassification reward models --------------------------------------------------


def test_seq_cls_reward_model_scores_as_its_own_forward(seqcls_rm, tiny):
    """The score head becomes the value head; ppomax's score at the last response token of a left-padded
    rollout batch equals the model's own forward (HF pools at the last non-pad token)."""
    from transformers import AutoModelForSequenceClassification

    hf = AutoModelForSequenceClassification.from_pretrained(seqcls_rm).eval()
    rm = ScalarHeadModel.from_pretrained(seqcls_rm).eval()
    assert torch.equal(rm.v_head.weight, hf.score.weight.float()) and torch.equal(rm.v_head.bias, torch.zeros(1))
    assert rm.metadata["source"] == "seq-cls"
    seqs = [([5, 6, 7], [8, 9]), ([10, 11], [12, 13, 14])]  # (prompt, response); no pad id (0) inside
    P, T = 3, 3
    p_ids = torch.zeros(2, P, dtype=torch.long)
    p_mask = torch.zeros(2, P, dtype=torch.long)
    r_ids = torch.zeros(2, T, dtype=torch.long)
    r_mask = torch.zeros(2, T, dtype=torch.long)
    for i, (p, r) in enumerate(seqs):  # prompts left-padded, responses right-padded, as in a rollout
        p_ids[i, P - len(p):], p_mask[i, P - len(p):] = torch.tensor(p), 1
        r_ids[i, : len(r)], r_mask[i, : len(r)] = torch.tensor(r), 1
    with torch.no_grad():
        ours = reward_model_scores(rm, p_ids, p_mask, r_ids, r_mask)
        theirs = torch.cat([hf(input_ids=torch.tensor([p + r])).logits[:, 0] for p, r in seqs])
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    assert (ours - ours.mean()).abs().max() > 1e-3  # the two sequences score differently


def test_ppo_takes_a_seq_cls_reward_model_and_critic_init_from_it(seqcls_rm, tiny, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from ppomax.ppo.trainer import PPOTrainer

    head = AutoModelForSequenceClassification.from_pretrained(seqcls_rm).score.weight.detach().float()
    tr = PPOTrainer(_ppo(tiny, tmp_path / "a", reward_model_path=seqcls_rm, critic_init="reward_model"), prompts=PROMPTS)
    assert torch.equal(tr.reward_model.v_head.weight, head) and torch.equal(tr.critic.v_head.weight, head)
    rows = tr.train()
    assert torch.isfinite(torch.tensor(rows[-1]["reward/raw_mean"]))
    # TRL's objects in Python: reward_model= and value_model= (critic=) as AutoModelForSequenceClassification
    objs = [AutoModelForSequenceClassification.from_pretrained(seqcls_rm) for _ in range(2)]
    tr2 = PPOTrainer(_ppo(tiny, tmp_path / "b"), prompts=PROMPTS, reward_model=objs[0], critic=objs[1])
    assert isinstance(tr2.reward_model, ScalarHeadModel) and torch.equal(tr2.critic.v_head.weight, head)


def test_a_causal_lm_is_not_taken_as_a_reward_model(tiny):
    with pytest.raises(ValueError, match="neither a ppomax scalar-head model .* train one with `ppomax rm`"):
        ScalarHeadModel.from_pretrained(tiny)


def test_export_seq_cls_loads_in_transformers_with_equal_scores(tiny, tmp_path, caplog):
    from transformers import AutoModelForSequenceClassification

    from ppomax.cli import main

    torch.manual_seed(0)
    rm = ScalarHeadModel.from_causal_lm(tiny).eval()
    rm.save_pretrained(tmp_path / "rm", tokenizer=load_tokenizer(tiny))  # what `ppomax rm` writes
    assert main(["export", "--to", "seq-cls", "--checkpoint", str(tmp_path / "rm"), "--output_dir",
                 str(tmp_path / "hf")]) == 0
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == "LlamaForSequenceClassification" and hf.config.num_labels == 1
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits[:, 0], rm(ids, torch.ones_like(ids))[:, -1],
                                   atol=1e-5, rtol=1e-5)
    assert "pad token is the EOS token" in caplog.text  # the tiny tokenizer's pad is its EOS: said at export
    # bfloat16 export; a non-zero bias cannot go into HF's bias-free head: dropped with a warning
    with torch.no_grad():
        rm.v_head.bias.fill_(0.25)
    from ppomax.seqcls import export_seq_cls

    export_seq_cls(rm, tmp_path / "bf16", dtype="bfloat16")
    assert "bias 0.25 is dropped" in caplog.text
    assert AutoModelForSequenceClassification.from_pretrained(tmp_path / "bf16", dtype="auto").dtype == torch.bfloat16


# ---- 2. Hub ids -------------------------------------------------------------------------------------------


def _hub_cache(tiny, root, repo="tiny-org/tiny-sft"):
    """A Hugging Face cache entry as huggingface_hub writes it: models--org--name/{refs/main, snapshots/<rev>}."""
    rev = "0123456789abcdef0123456789abcdef01234567"
    entry = root / f"models--{repo.replace('/', '--')}"
    shutil.copytree(tiny, entry / "snapshots" / rev)
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text(rev)
    return repo


def test_hub_id_loads_from_the_cache_offline(tiny, tmp_path, monkeypatch):
    from huggingface_hub import constants

    repo = _hub_cache(tiny, tmp_path)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    model = load_causal_lm(repo)
    ref = load_causal_lm(tiny)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref.state_dict().values()))
    assert load_tokenizer(repo).eos_token == "<|endoftext|>"
    with pytest.raises(FileNotFoundError, match="other-org/missing: .* not in the Hugging Face cache .* HF_HUB_OFFLINE=1"):
        load_causal_lm("other-org/missing")


def test_hub_id_downloads_through_huggingface_hub(tiny, monkeypatch):
    """Online, a Hub id goes to huggingface_hub.snapshot_download (mocked here: no network in tests), which
    downloads configs, tokenizer files and safetensors only, never pickle weights."""
    import huggingface_hub

    calls = []

    def fake_snapshot_download(repo_id, **kw):
        calls.append((repo_id, kw))
        return tiny

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    model = load_causal_lm("Qwen/Qwen2.5-1.5B-Instruct")
    assert type(model).__name__ == "LlamaForCausalLM"
    repo_id, kw = calls[0]
    assert repo_id == "Qwen/Qwen2.5-1.5B-Instruct" and not kw.get("local_files_only")
    assert "*.safetensors" in kw["allow_patterns"] and not any(p.endswith((".bin", ".pt", ".py"))
                                                               for p in kw["allow_patterns"])


def test_hub_dataset_id_loads_through_datasets(monkeypatch):
    import datasets

    from ppomax.data import DataError, load_rows

    calls = []

    def fake_load_dataset(name, split=None):
        calls.append((name, split))
        if name == "org/offline":
            raise ConnectionError("Couldn't reach 'org/offline' on the Hub (LocalEntryNotFoundError)")
        return datasets.Dataset.from_list([{"prompt": "a b"}, {"prompt": ""}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    with pytest.raises(DataError, match="org/prompts:test: row 2: field 'prompt' is empty"):
        load_rows("org/prompts:test", "prompt")
    rows, skipped = load_rows("org/prompts", "prompt", skip_bad_rows=True)
    assert rows == [{"prompt": "a b"}] and skipped == 1
    assert calls == [("org/prompts", "test"), ("org/prompts", "train")]
    with pytest.raises(DataError, match="org/offline: no such file or directory, and datasets.load_dataset"):
        load_rows("org/offline", "prompt")
    with pytest.raises(DataError, match="data/missing.jsonl: no such file"):  # a file name is not a Hub id
        load_rows("data/missing.jsonl", "prompt")
    assert len(calls) == 3


# ---- 3. dtypes and attention ------------------------------------------------------------------------------


def test_each_model_loads_in_its_dtype(tiny, tmp_path):
    from ppomax.ppo.setup import load_models

    torch.manual_seed(0)
    ScalarHeadModel.from_causal_lm(tiny).save_pretrained(tmp_path / "rm")
    rm = str(tmp_path / "rm")
    # full fine-tuning: trained models keep fp32 master weights, frozen ones load in torch_dtype
    pol, ref, r, critic = load_models(_ppo(tiny, tmp_path / "o", reward_model_path=rm, torch_dtype="bfloat16"))
    assert pol.dtype == torch.float32 and critic.backbone.dtype == torch.float32
    assert ref.dtype == torch.bfloat16 and r.backbone.dtype == torch.bfloat16 and r.v_head.weight.dtype == torch.float32
    # LoRA: the frozen base in bf16, the adapters (and value heads) in fp32
    pol, ref, r, critic = load_models(_ppo(tiny, tmp_path / "o", reward_model_path=rm, torch_dtype="bfloat16",
                                           use_peft=True, critic_use_peft=True, lora_target_modules="all-linear"))
    dtypes = {n.split(".")[-2] if "lora_" in n else "base": p.dtype for n, p in pol.named_parameters()}
    assert ref is None and dtypes == {"base": torch.bfloat16, "default": torch.float32}
    assert critic.backbone.base_model.model.layers[0].self_attn.q_proj.base_layer.weight.dtype == torch.bfloat16
    assert critic.v_head.weight.dtype == torch.float32
    # TRL's behaviour: trained weights in torch_dtype too
    pol, *_ = load_models(_ppo(tiny, tmp_path / "o", reward_model_path=rm, torch_dtype="bfloat16",
                               fp32_master_weights=False), with_reward_model=False)
    assert pol.dtype == torch.bfloat16


def test_attn_implementation_is_validated_and_passed(tiny):
    with pytest.raises(ConfigError, match="attn_implementation = 'flash' is invalid"):
        SFTConfig(attn_implementation="flash")
    import importlib.util

    if importlib.util.find_spec("flash_attn") is None and importlib.util.find_spec("kernels") is None:
        with pytest.raises(ConfigError, match="needs the flash_attn package"):
            PPOConfig(attn_implementation="flash_attention_2")
    assert load_causal_lm(tiny, attn_implementation="eager").config._attn_implementation == "eager"


# ---- 5. the final model and --push_to_hub -----------------------------------------------------------------


def test_final_policy_is_a_plain_hf_model_in_the_requested_dtype(tiny, tmp_path, monkeypatch):
    """output_dir holds the policy as AutoModelForCausalLM loads it, in --torch_dtype, with the tokenizer;
    the checkpoint keeps fp32 for exact resume; --push_to_hub uploads it (HfApi mocked at its boundary)."""
    from huggingface_hub import HfApi
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ppomax.ppo.trainer import PPOTrainer

    events = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: events.append(("create", repo_id, kw))
                        or type("Url", (), {"repo_id": repo_id})())

    def fake_upload(self, repo_id, folder_path, **kw):
        events.append(("upload", repo_id, sorted(os.listdir(folder_path)), kw))

    monkeypatch.setattr(HfApi, "upload_folder", fake_upload)
    cfg = _ppo(tiny, tmp_path / "run", critic_init="sft", torch_dtype="bfloat16", push_to_hub=True,
               hub_model_id="me/ppo-tiny")
    tr = PPOTrainer(cfg, prompts=PROMPTS, reward_fn=lambda p, r: [float(len(x)) for x in r])
    assert events == [("create", "me/ppo-tiny", {"private": None, "exist_ok": True})]  # before any compute
    tr.train()
    out = tmp_path / "run"
    final = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert final.dtype == torch.bfloat16 and json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    for name, p in tr.policy.state_dict().items():
        assert torch.equal(final.state_dict()[name], p.to(torch.bfloat16)), name
    assert AutoTokenizer.from_pretrained(out).eos_token == "<|endoftext|>"
    ckpt = AutoModelForCausalLM.from_pretrained(out / "checkpoint-1" / "policy", dtype="auto")
    assert ckpt.dtype == torch.float32
    kind, repo, files, kw = events[-1]
    assert kind == "upload" and repo == "me/ppo-tiny" and "model.safetensors" in files
    assert "*/*" in kw["ignore_patterns"] and "*.jsonl" in kw["ignore_patterns"]  # no checkpoints, no logs


def test_final_lora_policy_merged_or_as_an_adapter(tiny, tmp_path):
    from ppomax.ppo.trainer import PPOTrainer

    ids = torch.tensor([[5, 6, 7, 8, 9]])
    for merged in (True, False):
        out = tmp_path / f"merged_{merged}"
        cfg = _ppo(tiny, out, critic_init="sft", use_peft=True, save_merged=merged, learning_rate=5e-2)
        tr = PPOTrainer(cfg, prompts=PROMPTS, reward_fn=lambda p, r: [float(len(x)) for x in r])
        tr.train()
        with torch.no_grad():
            want = tr.policy(input_ids=ids).logits
            base = load_causal_lm(tiny)(input_ids=ids).logits
        assert is_adapter_dir(out) != merged and (out / "adapter_config.json").exists() != merged
        got = load_causal_lm(out)(input_ids=ids).logits  # a plain model, or base + adapter merged on load
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert (got - base).abs().max() > 1e-4  # the adapters moved: the comparison is not base vs base


def test_push_to_hub_needs_a_repo_id_before_anything_runs():
    with pytest.raises(ConfigError, match="push_to_hub needs --hub_model_id"):
        PPOConfig(push_to_hub=True)
    with pytest.raises(ConfigError, match="hub_model_id = 'a/b/c' is not a Hub repo id"):
        SFTConfig(hub_model_id="a/b/c")


def test_sft_and_rm_save_their_final_model_in_the_requested_dtype(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    from ppomax.config import RewardConfig
    from ppomax.reward import train_reward_model
    from ppomax.sft import train_sft

    common = dict(model_name_or_path=tiny, max_steps=1, per_device_train_batch_size=2, eval_split=0.0,
                  report_to="none", disable_tqdm=True, torch_dtype="bfloat16")
    train_sft(SFTConfig(dataset=[{"prompt": "a b", "response": "c d"}] * 2, output_dir=str(tmp_path / "sft"),
                        **common))
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "sft", dtype="auto").dtype == torch.bfloat16
    pairs = [{"prompt": "a b", "chosen": "good", "rejected": "bad bad"}] * 2
    train_reward_model(RewardConfig(dataset=pairs, output_dir=str(tmp_path / "rm"), **common))
    rm = ScalarHeadModel.from_pretrained(tmp_path / "rm", dtype="auto")
    assert rm.backbone.dtype == torch.bfloat16 and rm.v_head.weight.dtype == torch.float32
    with pytest.raises(ConfigError, match="reward model is always saved merged"):
        RewardConfig(use_peft=True, save_merged=False)
