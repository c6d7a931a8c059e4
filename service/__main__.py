"""`python -m service`: placeholder until this package's CLI lands."""
import sys


def main(argv=None) -> int:
    print("service: not implemented yet", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
