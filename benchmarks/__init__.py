"""The project's benchmarks (``python -m benchmarks``, from the repository root) and scripts.

Modules of the speed benchmark: :mod:`benchmarks.bench` (the command line), ``runner`` (the run
loop and one method per recipe), ``cases`` (the case specs), ``baseline`` (diffusers' recipe
step, and the shared reference when present), ``timers`` (clocks and Lightning timing
callbacks), ``models`` (random-weight model folders, images, FLOPs), ``report`` (ratios, MFU,
tables) and ``e2e`` (a job through the queue worker). Scripts run by hand: ``compile_cache.py``
(first against second process compile), ``load_test.py``, ``image_memory.py``; ``gpu_run.sh`` is
the one-command GPU run.
"""
