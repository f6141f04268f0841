"""Shared test setup."""

import os

import pytest
import torch

# cuBLAS takes its workspace setting when the first CUDA matmul creates its handle, so the tests that
# run with --full_determinism on a GPU need it set before any test touches CUDA. It changes no number.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread, results do not depend on the core count, and
    2-thread torch next to a busy core can be many times slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _restore_determinism_settings():
    """``--full_determinism`` sets process-wide flags (as transformers' enable_full_determinism does);
    a test that turns them on must not change how the tests after it run."""
    env = {k: os.environ.get(k) for k in ("CUBLAS_WORKSPACE_CONFIG", "FLASH_ATTENTION_DETERMINISTIC")}
    det = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    new_tf32_api = hasattr(torch.backends, "fp32_precision")  # torch >= 2.9 (mixing both APIs raises)
    tf32 = torch.backends.fp32_precision if new_tf32_api else (torch.backends.cuda.matmul.allow_tf32,
                                                               torch.backends.cudnn.allow_tf32)
    cudnn = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    cuda = torch.backends.cuda
    sdp = (cuda.flash_sdp_enabled(), cuda.mem_efficient_sdp_enabled(), cuda.math_sdp_enabled(),
           cuda.cudnn_sdp_enabled() if hasattr(cuda, "cudnn_sdp_enabled") else None)
    yield
    for k, v in env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    torch.use_deterministic_algorithms(det[0], warn_only=det[1])
    if new_tf32_api:
        torch.backends.fp32_precision = tf32
    else:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn
    cuda.enable_flash_sdp(sdp[0])
    cuda.enable_mem_efficient_sdp(sdp[1])
    cuda.enable_math_sdp(sdp[2])
    if sdp[3] is not None:
        cuda.enable_cudnn_sdp(sdp[3])
