"""`python -m export`: placeholder until this package's CLI lands."""
import sys


def main(argv=None) -> int:
    print("export: not implemented yet", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
