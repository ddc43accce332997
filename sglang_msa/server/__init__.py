"""The memory API served on SGLang's own HTTP port: schemas, metadata, prompts, routes."""
