"""``python -m taildet`` (also what ``torchrun ... -m taildet train`` runs)."""

from taildet.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
