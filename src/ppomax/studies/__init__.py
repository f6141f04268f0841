"""What ppomax runs to show itself: programs that use the library like any user would.

- :mod:`~ppomax.studies.demo` (``ppomax demo``): SFT → reward model → PPO-max vs vanilla PPO on the
  embedded ``reviews`` task (:mod:`~ppomax.studies.tasks.reviews`), with a report;
- :mod:`~ppomax.studies.ablate` (``ppomax ablate``): PPO-max's details switched off one at a time;
- :mod:`~ppomax.studies.smollm2_study` (``ppomax demo --model smollm2``): the contrast on a real
  pretrained model, with its task, results and pre-registered targets (``smollm2_task``,
  ``smollm2_results``, ``smollm2_targets``);
- :mod:`~ppomax.studies.report` and :mod:`~ppomax.studies.plots`: their reports;
- :mod:`~ppomax.studies.runs`: what they share (cached stages, methods side by side);
- :mod:`~ppomax.studies.config`: ``DemoConfig`` and ``AblateConfig``, the flags of their commands.

The rules (tests/test_layers.py): the library (``ppomax`` outside ``studies``, ``tools`` and the
CLI) never imports a study; a study imports only public names, of the library and of other studies.
"""
