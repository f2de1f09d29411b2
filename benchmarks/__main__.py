"""``python -m benchmarks``: the training-step benchmark (:mod:`benchmarks.bench`)."""

import sys

from benchmarks.bench import main

sys.exit(main())
