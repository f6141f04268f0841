"""Devices, process groups, RNG forks and determinism (issue 20): what a GPU run needs, checked on CPU.

CI has no GPU, so each GPU rule has a CPU twin here that fails on the bug it guards against:
- ``--device auto|cpu|cuda|cuda:N``: validated before any model loads; 'auto' is cuda:LOCAL_RANK
  under several processes; the process group's backend follows the device (NCCL / gloo);
- more processes than GPUs: a UserError naming both numbers, before any model loads (CUDA is
  faked with monkeypatch: nothing here touches a GPU);
- every reseed forks every device's generator: a fake CUDA generator shows whether evaluation,
  ``sample_responses`` and ``build_tiny_model`` leave CUDA's stream where it was (on a GPU,
  ``torch.manual_seed`` reseeds CUDA, and restoring only the CPU state restarts training's
  rollouts from the same numbers after each evaluation);
- collectives: an AST rule that every tensor factory of the step and collective code names its
  ``device=`` (NCCL rejects CPU tensors; the bug class GPU.md found in four places), that only
  distributed.py / sharding.py call torch.distributed, and the runtime check the two-process tests
  run under (``PPOMAX_CHECK_COLLECTIVES=1``, tests/test_distributed.py);
- ``--full_determinism``: the flags transformers' ``enable_full_determinism`` sets, and on CPU the
  same numbers with it as without.
"""

from __future__ import annotations

import ast
import copy
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from ppomax import distributed as dist_lib
from ppomax import training
from ppomax.config import ConfigError, EvalConfig, PPOConfig, SFTConfig
from ppomax.errors import UserError
from ppomax.models import ScalarHeadModel, build_tiny_model, load_causal_lm, load_tokenizer

SRC = Path(__file__).resolve().parents[1] / "src" / "ppomax"
PROMPTS = ["Say some words:", "Say a few words:", "Say three words:", "Say words:"]


def n_chars(prompts, responses):
    return [float(len(r)) for r in responses]


def fake_gpus(monkeypatch, n: int) -> None:
    """torch reports ``n`` CUDA devices (0: none); nothing that would touch a real GPU is called."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return build_tiny_model(tmp_path_factory.mktemp("tiny"), num_layers=1, hidden_size=32, num_heads=2)


# ---------------------------------------------------------------------------------------------
# --device
# ---------------------------------------------------------------------------------------------


def test_device_flag_is_validated_before_any_model_loads(monkeypatch):
    with pytest.raises(ConfigError, match=r"PPOConfig.device = 'gpu' is not a device: allowed 'auto'"):
        PPOConfig(device="gpu")
    with pytest.raises(ConfigError, match=r"is not a device"):
        SFTConfig(device="cuda:x")
    fake_gpus(monkeypatch, 0)
    for cls in (PPOConfig, SFTConfig):
        with pytest.raises(ConfigError, match=rf"{cls.__name__}.device = 'cuda' but CUDA is not available"):
            cls(device="cuda")
    with pytest.raises(ConfigError, match=r"EvalConfig.device = 'cuda:0' but CUDA is not available"):
        EvalConfig(model_name_or_path="m", output_dir="o", task="reviews", device="cuda:0")
    assert PPOConfig(device="cpu").device == "cpu" and PPOConfig().device == "auto"
    fake_gpus(monkeypatch, 2)
    assert PPOConfig(device="cuda:1").device == "cuda:1"
    with pytest.raises(ConfigError, match=r"device = 'cuda:2' but only 2 CUDA device\(s\) are visible"):
        PPOConfig(device="cuda:2")


def test_the_device_rule(monkeypatch):
    fake_gpus(monkeypatch, 0)
    assert training.resolve_device("auto") == torch.device("cpu")  # today's rule without CUDA
    assert training.resolve_device("auto", local_rank=1) == torch.device("cpu")
    fake_gpus(monkeypatch, 2)
    assert training.resolve_device("auto") == torch.device("cuda", 0)  # today's rule with CUDA
    assert training.resolve_device("cpu") == torch.device("cpu")
    assert training.resolve_device("cuda:1") == torch.device("cuda", 1)
    assert training.resolve_device("auto", local_rank=1) == torch.device("cuda", 1)  # one GPU per rank
    assert training.resolve_device("cuda", local_rank=1) == torch.device("cuda", 1)
    with pytest.raises(UserError, match=r"puts every process on one GPU"):
        training.resolve_device("cuda:0", local_rank=1)


def test_the_cli_has_device_and_full_determinism_in_every_stage_that_trains_or_samples():
    from ppomax.cli import build_config, make_parser

    parser = make_parser()
    for stage in ("sft", "rm", "ppo", "eval"):
        ns = parser.parse_args([stage, "--device", "cpu", "--full_determinism", "--output_dir", "o",
                                "--model_name_or_path", "m", "--dataset", "d"])
        cls = ns.cls
        del ns.cls
        cfg = build_config(cls, ns)
        assert (cfg.device, cfg.full_determinism) == ("cpu", True), stage


def test_models_passed_in_python_are_moved_to_the_trainers_device(tiny, tmp_path):
    """The documented placement (PPOTrainer's docstring): the given objects, moved in place."""
    from ppomax.ppo.trainer import PPOTrainer

    policy, ref = load_causal_lm(tiny), load_causal_lm(tiny)
    tr = PPOTrainer(PPOConfig.from_preset("ppo_max", output_dir=str(tmp_path), device="cpu", critic_init="sft",
                                          model_name_or_path=tiny, rollout_batch_size=4, num_mini_batches=2,
                                          report_to="none", disable_tqdm=True),
                    policy=policy, ref_policy=ref, tokenizer=load_tokenizer(tiny), prompts=PROMPTS, reward_fn=n_chars)
    assert tr.device == tr.dist.device == torch.device("cpu")
    assert tr.policy is policy and tr.ref_policy is ref
    assert {p.device for m in (tr.policy, tr.ref_policy, tr.critic) for p in m.parameters()} == {tr.device}


# ---------------------------------------------------------------------------------------------
# Processes vs GPUs, and the backend
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def launched(monkeypatch):
    """The environment torchrun gives rank 1 of 2 on one node; joining the group is recorded, not done."""
    import torch.distributed as dist

    joined = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)

    def init(backend=None, **kw):
        joined.append(backend)
        raise _Joined(backend)

    monkeypatch.setattr(dist, "init_process_group", init)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: joined.append(f"set_device {d}"))
    return joined


class _Joined(Exception):
    """Stops setup() where it would join the process group."""


def test_more_processes_than_gpus_is_a_user_error_naming_both_before_any_model_loads(launched, monkeypatch,
                                                                                        tmp_path):
    from ppomax import models as M
    from ppomax.config import RewardConfig
    from ppomax.ppo.trainer import PPOTrainer
    from ppomax.reward import train_reward_model
    from ppomax.sft import train_sft

    fake_gpus(monkeypatch, 1)

    def no_load(*a, **k):
        raise AssertionError("a model or tokenizer was loaded before the device check")

    for name in ("load_causal_lm", "load_tokenizer"):
        monkeypatch.setattr(M, name, no_load)
    msg = r"2 processes on this node but 1 visible GPU\(s\): launch at most 1"
    with pytest.raises(UserError, match=msg):
        dist_lib.setup("auto")
    with pytest.raises(UserError, match=msg):
        PPOTrainer(PPOConfig(model_name_or_path="m", output_dir=str(tmp_path), rollout_batch_size=4,
                             num_mini_batches=2), reward_fn=n_chars, prompts=PROMPTS)
    with pytest.raises(UserError, match=msg):
        train_sft(SFTConfig(model_name_or_path="m", dataset="d.jsonl", output_dir=str(tmp_path)))
    with pytest.raises(UserError, match=msg):
        train_reward_model(RewardConfig(model_name_or_path="m", dataset="d.jsonl", output_dir=str(tmp_path)))
    assert launched == []  # neither set_device nor the process group was reached


@pytest.mark.parametrize("gpus, device, expect", [
    (0, "auto", ["gloo"]),  # hidden GPUs (CUDA_VISIBLE_DEVICES=) mean CPU and gloo
    (2, "cpu", ["gloo"]),  # --device cpu on a GPU machine: gloo, not NCCL
    (2, "auto", ["set_device cuda:1", "nccl"]),  # rank 1 takes cuda:LOCAL_RANK
])
def test_the_backend_follows_the_device(launched, monkeypatch, gpus, device, expect):
    fake_gpus(monkeypatch, gpus)
    with pytest.raises(_Joined):
        dist_lib.setup(device)
    assert launched == expect


# ---------------------------------------------------------------------------------------------
# RNG: every reseed forks every device's generator
# ---------------------------------------------------------------------------------------------


class FakeCudaRNG:
    """One CUDA device's generator, as torch.cuda's RNG functions see it (its state: the last seed)."""

    def __init__(self, monkeypatch) -> None:
        self.state = torch.tensor([7], dtype=torch.int64)
        fake_gpus(monkeypatch, 1)
        monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": self.state.clone())
        monkeypatch.setattr(torch.cuda, "set_rng_state", self._set)
        monkeypatch.setattr(torch.cuda, "manual_seed_all", self._seed)
        monkeypatch.setattr(torch.cuda, "manual_seed", self._seed)

    def _set(self, state, device="cuda") -> None:
        self.state = state.clone()

    def _seed(self, seed) -> None:
        self.state = torch.tensor([int(seed)], dtype=torch.int64)


def _all_streams() -> tuple:
    return torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()


def _same_streams(a: tuple, b: tuple) -> bool:
    return torch.equal(a[0], b[0]) and a[1] == b[1] and np.array_equal(a[2], b[2])


def test_forked_rng_restores_every_generator_and_seeds_them_all(monkeypatch):
    cuda = FakeCudaRNG(monkeypatch)
    training.set_seed(3)
    before, cuda_before = _all_streams(), cuda.state.clone()
    with training.forked_rng(11):
        assert torch.initial_seed() == 11 and cuda.state.item() == 11  # the block runs on its own seed
        torch.randn(5), random.random(), np.random.rand()
    assert _same_streams(before, _all_streams())
    assert torch.equal(cuda.state, cuda_before)


def test_sample_responses_leaves_the_cuda_stream_alone(tiny, monkeypatch):
    from ppomax.evaluate import sample_responses

    policy, tok = load_causal_lm(tiny), load_tokenizer(tiny)
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    first = sample_responses(policy, tok, ids, response_length=5, seed=3)["responses"]
    cuda = FakeCudaRNG(monkeypatch)
    before = _all_streams()
    again = sample_responses(policy, tok, ids, response_length=5, seed=3)["responses"]
    assert again == first  # its own seed: the same samples whatever the caller's state
    assert _same_streams(before, _all_streams())
    assert cuda.state.item() == 7, "sample_responses moved CUDA's generator (torch.manual_seed reseeds it)"


def test_ppo_evaluation_leaves_the_cuda_stream_alone(tiny, monkeypatch, tmp_path):
    from ppomax.ppo import evaluation
    from ppomax.ppo.trainer import PPOTrainer

    tr = PPOTrainer(PPOConfig.from_preset(
        "ppo_max", model_name_or_path=tiny, output_dir=str(tmp_path), critic_init="sft", rollout_batch_size=4,
        num_mini_batches=2, response_length=5, eval_steps=1, report_to="none", disable_tqdm=True),
        prompts=PROMPTS, eval_prompts=PROMPTS, reward_fn=n_chars)
    cuda = FakeCudaRNG(monkeypatch)
    before = _all_streams()
    metrics = evaluation.evaluate(tr, tr.eval_prompt_ids)
    assert metrics["eval/length"] > 0
    assert _same_streams(before, _all_streams())
    assert cuda.state.item() == 7, "evaluation moved CUDA's generator: training's rollouts would restart"


def test_building_a_seeded_model_leaves_the_cuda_stream_alone(tmp_path, monkeypatch):
    cuda = FakeCudaRNG(monkeypatch)
    before = _all_streams()
    build_tiny_model(tmp_path / "m", num_layers=1, hidden_size=16, num_heads=2, seed=5)
    assert _same_streams(before, _all_streams()) and cuda.state.item() == 7


def test_every_reseed_in_the_library_goes_through_the_fork_helper():
    """torch.manual_seed / set_rng_state / fork_rng appear only in training.py (set_seed, forked_rng),
    checkpoint.py (restoring a saved state) and graph_decode.py (restoring the state saved before a CUDA
    graph's warm-up); a torch.Generator's own manual_seed is fine."""
    # graph_decode.py puts back the CUDA state it saved before its warm-up steps, so the captured step
    # draws what the eager step would have: a restore of the same stream, not a reseed
    owners = {"training.py", "checkpoint.py", "graph_decode.py"}
    found = []
    for path in sorted(SRC.rglob("*.py")):
        if path.name in owners or path.relative_to(SRC).parts[0] == "studies":  # recipes: seeded once, whole
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                src = ast.unparse(node.func)
                if src in ("torch.manual_seed", "torch.set_rng_state", "torch.random.fork_rng",
                           "torch.cuda.manual_seed_all", "torch.cuda.set_rng_state", "torch.cuda.manual_seed"):
                    found.append(f"{path.relative_to(SRC)}:{node.lineno} {src}")
    assert not found, found


# ---------------------------------------------------------------------------------------------
# Collectives
# ---------------------------------------------------------------------------------------------

# The step and collective code: every tensor made here is used on the process's device.
STEP_FILES = ("distributed.py", "sharding.py", "loop.py", "training.py", "gradients.py", "functional/reductions.py",
              "functional/logprobs.py", "functional/rewards.py", "functional/estimators.py", "functional/losses.py",
              "sft.py", "reward.py", "evaluate.py", "engines/__init__.py", "engines/base.py", "engines/hf.py",
              "engines/vllm.py", "engines/graph_decode.py", "ppo/trainer.py", "ppo/rollout.py", "ppo/sampling.py",
              "ppo/setup.py", "ppo/state.py", "ppo/advantages.py", "ppo/evaluation.py", "ppo/best.py", "ppo/monitors.py",
              "ppo/experience.py", "ppo/update.py")
FACTORIES = {"tensor", "as_tensor", "zeros", "ones", "full", "empty", "arange", "eye", "linspace", "logspace",
             "rand", "randn", "randint", "randperm", "empty_strided", "tril_indices", "triu_indices"}
# (file, function) -> why a factory there needs no device=: host-side values that never meet a device tensor.
HOST_FACTORIES = {
    ("ppo/setup.py", "IndexSampler._make_perm"): "a seeded CPU generator's permutation, read back with .tolist()",
    ("loop.py", "batches"): "a seeded CPU generator's permutation, read back with .tolist()",
    ("ppo/monitors.py", "gold_metrics"): "statistics of the judge's Python floats, read back with .item()",
    ("engines/vllm.py", "VLLMEngine.generate"): "one seed drawn for vLLM's SamplingParams, read back with int()",
    ("engines/vllm.py", "_to_generation"): "vLLM returns Python lists; assembled on the host, moved once with .to()",
}


def _factory_calls(path: Path) -> list[tuple[str, int, str]]:
    """(enclosing function qualname, line, call) of each torch factory call without ``device=``."""
    out = []

    def visit(node, scope):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                visit(child, [*scope, child.name])
                continue
            if isinstance(child, ast.Call) and isinstance(child.func, ast.Attribute) \
                    and isinstance(child.func.value, ast.Name) and child.func.value.id == "torch" \
                    and child.func.attr in FACTORIES and not any(k.arg == "device" for k in child.keywords):
                out.append((".".join(scope), child.lineno, ast.unparse(child)[:80]))
            visit(child, scope)

    visit(ast.parse(path.read_text(encoding="utf-8")), [])
    return out


def test_every_tensor_factory_in_the_step_names_its_device():
    """NCCL rejects CPU tensors: a factory without device= in the step or a collective is the bug
    GPU.md found (``_all_ranks``, ``reduce_floats``, the loop's and set-up's reductions). CI has no
    GPU to see it fail, so the rule is checked on the source."""
    bad, used = [], set()
    for rel in STEP_FILES:
        for scope, line, call in _factory_calls(SRC / rel):
            if (rel, scope) in HOST_FACTORIES:
                used.add((rel, scope))
            else:
                bad.append(f"{rel}:{line} in {scope or '<module>'}: {call}")
    assert not bad, "tensor factories without device= (NCCL would be handed a CPU tensor):\n" + "\n".join(bad)
    assert used == set(HOST_FACTORIES), f"stale allow-list entries: {set(HOST_FACTORIES) - used}"


def _distributed_names(tree: ast.AST) -> set[str]:
    """Names a module binds to torch.distributed (``import torch.distributed as dist``, ...)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.asname for a in node.names if a.name == "torch.distributed" and a.asname}
        elif isinstance(node, ast.ImportFrom) and node.module == "torch":
            names |= {a.asname or a.name for a in node.names if a.name == "distributed"}
    return names


def test_only_distributed_and_sharding_call_collectives():
    bad = []
    for path in sorted(SRC.rglob("*.py")):
        rel = str(path.relative_to(SRC))
        if rel in dist_lib.COLLECTIVE_OWNERS:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        names = _distributed_names(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "torch.distributed":
                bad += [f"{rel}:{node.lineno} imports {a.name}" for a in node.names if a.name in dist_lib.COLLECTIVES]
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                    and node.func.attr in dist_lib.COLLECTIVES:
                owner = ast.unparse(node.func.value)
                if owner in names or owner == "torch.distributed":
                    bad.append(f"{rel}:{node.lineno} {ast.unparse(node.func)}")
    assert not bad, bad


def test_the_collective_check_refuses_a_tensor_off_the_device_and_a_direct_call():
    """What PPOMAX_CHECK_COLLECTIVES=1 checks in every collective of the two-process tests."""
    on_gpu = dist_lib.Dist(0, 2, torch.device("meta"))  # any device but the tensor's stands in for cuda:0
    owner = str(SRC / "distributed.py")
    with pytest.raises(RuntimeError, match=r"all_reduce got a tensor on cpu .* this process's device is meta"):
        dist_lib.check_collective_call("all_reduce", [torch.zeros(2)], on_gpu, owner)
    dist_lib.check_collective_call("all_reduce", [torch.zeros(2, device="meta")], on_gpu, owner)
    cpu = dist_lib.Dist(0, 2, torch.device("cpu"))
    with pytest.raises(RuntimeError, match=r"trainer.py calls torch.distributed.broadcast directly"):
        dist_lib.check_collective_call("broadcast", [torch.zeros(2)], cpu, str(SRC / "ppo" / "trainer.py"))
    for caller in (str(SRC / "sharding.py"), "/site-packages/torch/distributed/fsdp/_fsdp_collectives.py"):
        dist_lib.check_collective_call("all_gather", [torch.zeros(1)], cpu, caller)
    assert len(dist_lib.collective_tensors(([torch.zeros(1), torch.zeros(1)], torch.zeros(1)), {"x": 1})) == 3


def test_the_wrappers_build_their_tensors_on_the_process_device(monkeypatch):
    """reduce_floats / all_true / sum_gradients hand torch.distributed tensors on Dist.device."""
    import torch.distributed as dist

    seen = []

    def all_reduce(t, op=None):
        seen.append(t.device)

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    d = dist_lib.Dist(0, 2, torch.device("meta"))
    with pytest.raises((NotImplementedError, RuntimeError)):  # meta tensors have no values to read back
        dist_lib.reduce_floats({"a": 1.0}, d)
    with pytest.raises((NotImplementedError, RuntimeError)):
        dist_lib.all_true(True, d)
    p = torch.nn.Parameter(torch.zeros(2, device="meta"))
    p.grad = torch.zeros(2, device="meta")
    with pytest.raises((NotImplementedError, RuntimeError)):
        dist_lib.sum_gradients([p], d)
    dist_lib.all_reduce_sum(torch.ones(2), d)
    assert seen == [torch.device("meta")] * 4


# ---------------------------------------------------------------------------------------------
# --full_determinism
# ---------------------------------------------------------------------------------------------


def test_full_determinism_sets_what_transformers_sets(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    fake_gpus(monkeypatch, 1)  # the attention switches are for CUDA's kernels (no GPU is touched)
    training.enable_full_determinism(5)
    assert torch.initial_seed() == 5
    assert torch.are_deterministic_algorithms_enabled() and not torch.is_deterministic_algorithms_warn_only_enabled()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert os.environ["FLASH_ATTENTION_DETERMINISTIC"] == "1"
    if hasattr(torch.backends, "fp32_precision"):
        assert torch.backends.cuda.matmul.fp32_precision == torch.backends.cudnn.conv.fp32_precision == "ieee"
    else:
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert not torch.backends.cuda.flash_sdp_enabled() and not torch.backends.cuda.mem_efficient_sdp_enabled()
    assert torch.backends.cuda.math_sdp_enabled()
    if hasattr(torch.backends.cuda, "cudnn_sdp_enabled"):
        assert not torch.backends.cuda.cudnn_sdp_enabled()
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")  # a user's valid setting is kept
    training.enable_full_determinism(5)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"


def test_the_stages_turn_it_on_before_their_models_are_placed(tiny, tmp_path):
    from ppomax.ppo.trainer import PPOTrainer

    assert not torch.are_deterministic_algorithms_enabled()
    PPOTrainer(PPOConfig.from_preset("ppo_max", model_name_or_path=tiny, output_dir=str(tmp_path), critic_init="sft",
                                     rollout_batch_size=4, num_mini_batches=2, full_determinism=True,
                                     report_to="none", disable_tqdm=True), prompts=PROMPTS, reward_fn=n_chars)
    assert torch.are_deterministic_algorithms_enabled()


@pytest.mark.skipif(torch.cuda.is_available(), reason="on CUDA the flag changes kernels (SDPA math, no TF32, "
                    "deterministic scatter): the numbers may differ in the last bits, which is its point")
def test_on_cpu_full_determinism_gives_the_same_run_as_without(tiny, tmp_path):
    """Bit for bit: the CPU's kernels are deterministic already (so its SDPA flash kernel stays on:
    switching to the math kernel changes the rounding, ~1e-7 in kl/ref here)."""
    from ppomax.ppo.trainer import PPOTrainer

    base = dict(model_name_or_path=tiny, critic_init="sft", rollout_batch_size=4, num_mini_batches=2,
                per_device_train_batch_size=2, response_length=6, max_steps=2, critic_pretrain_steps=1,
                learning_rate=1e-3, critic_learning_rate=1e-3, report_to="none", disable_tqdm=True, seed=1)
    runs = []
    for det in (False, True):
        tr = PPOTrainer(PPOConfig.from_preset("ppo_max", **base, output_dir=str(tmp_path / str(det)),
                                              full_determinism=det), prompts=PROMPTS, reward_fn=n_chars)
        runs.append((tr.train(), copy.deepcopy(tr.policy.state_dict())))
    (rows_a, w_a), (rows_b, w_b) = runs
    keys = ("reward/raw_mean", "kl/ref", "policy/loss", "critic/value_loss", "grad_norm/policy")
    assert [[r.get(k) for k in keys] for r in rows_a] == [[r.get(k) for k in keys] for r in rows_b]
    assert rows_a[-1]["policy/loss"] != 0.0
    assert all(torch.equal(w_a[k], w_b[k]) for k in w_a)


def test_a_reward_model_built_from_a_seed_is_the_same_inside_and_outside_a_fork(tiny):
    """forked_rng(seed) is a plain reseed for the code inside it."""
    torch.manual_seed(0)
    plain = ScalarHeadModel.from_causal_lm(tiny).v_head.weight.detach().clone()
    with training.forked_rng(0):
        forked = ScalarHeadModel.from_causal_lm(tiny).v_head.weight.detach().clone()
    assert torch.equal(plain, forked)
