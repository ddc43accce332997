"""Scheduler-side memory state: document tensors per memory (`store`), per-request MSA state
(`requests`), and the control channel the HTTP server talks to (`service`, `protocol`)."""
