"""flwr's round trip on its own (bench/flower_round.py)."""
