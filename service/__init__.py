"""service package."""

PROG = "python -m service"  # how its CLI runs as a module; convnext_common.prog_name gives it as the user ran it
