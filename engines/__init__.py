"""Engine adapters: the vLLM Serve deployment, the tiny local test model, KV-event
publishers. Empty until the live Ray Serve issue lands; nothing imports it yet."""
