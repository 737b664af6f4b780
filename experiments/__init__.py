"""Research scaffolding on the demo world, outside the package: each module measures one question and runs as
``python -m experiments.<name>`` from the repository's root (README.md here)."""
