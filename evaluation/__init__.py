"""The evaluation harness: benchmark readers, reference scorers, the bulk runner and the paper's
tables. Only the programs (evaluate.py, lmms_todre.py, bench.py) and the tests import it; the model
files at the top level know nothing of it."""
