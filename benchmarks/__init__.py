"""Speed and memory benchmarks against reference implementations (MONAI); not tests."""
