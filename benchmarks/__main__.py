"""``python -m benchmarks``: the same as ``lightning-lora-bench``."""

import sys

from benchmarks.bench import main

sys.exit(main())
