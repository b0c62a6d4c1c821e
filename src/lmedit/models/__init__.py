"""Models: loading, the handle (model + tokenizer + adapter + fingerprint) and architecture adapters."""
