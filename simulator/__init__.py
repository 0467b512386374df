"""The discrete-event simulator (vLLM-faithful replicas, trace replay). Empty until the
simulator issue lands; nothing imports it yet."""
