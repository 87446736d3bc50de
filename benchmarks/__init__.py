"""LoGo benchmarks: quality and speed, each with its own command."""
