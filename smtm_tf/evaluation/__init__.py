"""The evaluation layer: the one timing harness (interleaved runs, host work),
baselines, the benchmark, exit-rule comparisons and the zoo table. Sits on
the converters and everything below them."""
