"""Pure extraction code (no Django): hooks, tokenization, the streaming writer, statistics."""
