"""vlt.bench: benchmarks whose JSON output backs every speed claim (``vlt bench mixers``)."""
from vlt.bench.mixers import add_bench_mixers_args, run_bench_mixers

__all__ = ["add_bench_mixers_args", "run_bench_mixers"]
