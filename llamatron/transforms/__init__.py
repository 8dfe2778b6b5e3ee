"""Functions that change how an unmodified model computes, applied before the parallel layout: FP8
linears (`fp8.py`), activation checkpointing (`checkpointing.py`) and compile (`compile.py`)."""
