"""Rebuild the tables from the run records: ``python scripts/make_tables.py --records results --out results/tables``.

One table per spec in ``conf/tables/``, written as ``<out>/<name>.{md,tex,csv}`` with the published
numbers of ``results/paper/`` beside ours (see ``speft_bench/tables.py`` for the cell conventions).
With ``--claims conf/claims.yaml``, also ``<out>/claims.{md,csv}``: the papers' claims tested on the same
records (``speft_bench/claims.py``).
"""

import argparse
from pathlib import Path

from speft_bench.claims import write_claims
from speft_bench.tables import PAPER_DIR, TABLES_CONF, load_records, load_specs, write_tables


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=Path, default=Path("results"), help="searched for record.json")
    parser.add_argument("--out", type=Path, default=Path("results/tables"))
    parser.add_argument("--specs", type=Path, default=TABLES_CONF, help="folder of table YAMLs")
    parser.add_argument("--paper", type=Path, default=PAPER_DIR, help="folder of published-number CSVs")
    parser.add_argument("--claims", type=Path, help="claims YAML (conf/claims.yaml): also write <out>/claims.{md,csv}")
    args = parser.parse_args(argv)
    specs = load_specs(args.specs)
    written = write_tables(args.records, args.out, specs, args.paper)
    if args.claims:
        written += write_claims(args.claims, specs, load_records(args.records), args.out)
    for path in written:
        print(path)


if __name__ == "__main__":
    main()
