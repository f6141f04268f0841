"""ppomax: PPO-max RLHF for Hugging Face causal language models.

The recipe follows Zheng et al., "Secrets of RLHF in Large Language Models Part I: PPO"
(arXiv 2307.04964). Heavy modules (trainers, models) are imported lazily so that
``import ppomax`` and ``ppomax --help`` stay fast.
"""

__version__ = "0.1.0"
