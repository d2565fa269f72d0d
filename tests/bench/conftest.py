"""The benchmarks under tests/bench are scripts, never collected by pytest."""

collect_ignore_glob = ["*"]
