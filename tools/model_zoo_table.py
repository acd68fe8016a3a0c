#!/usr/bin/env python
"""Write a zoo's MODEL_ZOO.md from its index.json (publishing does it too, into the zoo).

    python tools/model_zoo_table.py --zoo output/zoo --output MODEL_ZOO.md
"""
import argparse
import os
import sys

from d2kd.model_zoo.publish import load_index
from d2kd.model_zoo.table import zoo_table


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo", required=True, help="the zoo folder (holds index.json)")
    parser.add_argument("--output", default="-", help="where to write the table (default: stdout)")
    parser.add_argument("--note", default="", help="a paragraph put above the table (e.g. how it was measured)")
    args = parser.parse_args(argv)
    if not os.path.isfile(os.path.join(args.zoo, "index.json")):
        sys.exit(f"model_zoo_table: {args.zoo} has no index.json (publish with tools/export_student.py --zoo)")
    text = zoo_table(load_index(args.zoo), note=args.note)
    if args.output == "-":
        sys.stdout.write(text)
    else:
        with open(args.output, "w") as f:
            f.write(text)
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
