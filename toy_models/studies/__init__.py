"""Studies built on the core and the toy: the experiment suites, the hand-off diagnostic, the benchmark."""
