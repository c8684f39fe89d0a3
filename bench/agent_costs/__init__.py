"""The measurements of ``bench/agent_bench.py``, whose docstring describes the method; one
module per table, plus the models, the broker side and what they share."""
