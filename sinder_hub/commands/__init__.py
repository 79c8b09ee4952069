"""The sub-commands of ``sinder-hub`` (see ``sinder_hub.cli``), one module each with ``main(argv) -> int``."""
