"""The parallel layouts, applied to a plain model of any family: FSDP2/HSDP (`fsdp.py`), tensor +
sequence parallel (each family's plan, `models/<family>/sharding.py`), pipeline stages and schedules
(`pipeline.py`), context parallel (`context_parallel.py`); the device mesh (`dims.py`), this rank's
`Layout` (`layout.py`), reductions over the right groups (`reduce.py`) and the memory estimate
(`memory.py`)."""
