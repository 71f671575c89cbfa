"""vlt.bench: benchmarks whose JSON output backs every speed claim (``vlt bench mixers``)."""
from vlt.bench.mixers import add_bench_mixers_args, run_bench_mixers

__all__ = ["add_bench_mixers_args", "run_bench_mixers"]


def module_main(prog: str, add_args, run, doc: str, argv=None) -> int:
    """``python -m vlt.bench.<name>``: the same command as ``vlt bench <name>``, for machines where
    only the benchmark's own dependencies are installed (the GPU image lacks the CLI's extras)."""
    import argparse
    parser = add_args(argparse.ArgumentParser(prog=prog, description=doc,
                                              formatter_class=argparse.RawDescriptionHelpFormatter))
    return run(parser.parse_args(argv))
