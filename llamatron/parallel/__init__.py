"""Functions that transform an unmodified `Transformer`: compile, activation checkpointing, and
(later) FSDP, tensor, pipeline and context parallelism."""
