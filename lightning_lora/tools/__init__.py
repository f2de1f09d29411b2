"""Command-line tools: ``lightning-lora-train``, ``lightning-lora-generate``, the sweep report."""
