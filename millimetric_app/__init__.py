"""The millimetric application: the `millimetric` command (`cli.py`), the whole pipeline on one
machine (`dev.py`) and the embedded services that dev, the tests and the benches start
(`embedded.py`). The composition root: it alone imports the stages (lazily, per command)."""
