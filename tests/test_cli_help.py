"""The bench --only help names exactly the registered measurements."""
from minilora.bench import MEASUREMENTS
from minilora.cli import build_parser


def test_bench_only_help_lists_every_measurement():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "cmd" or getattr(a, "choices", None)
               and "bench" in (a.choices or {}))
    bench = sub.choices["bench"]
    only = next(a for a in bench._actions if a.dest == "only")
    for name, _ in MEASUREMENTS:
        assert name in only.help, name
