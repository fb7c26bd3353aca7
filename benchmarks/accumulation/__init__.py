"""The rooms of ``benchmarks/accumulate.py``, the entry point (its docstring says what is
measured and how): ``workload`` (the demo towers, their inputs and one measured case) and
``report`` (the CSV, the markdown table and the plot)."""
