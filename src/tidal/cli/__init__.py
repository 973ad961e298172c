"""The ``tidal`` command: thin typer front-ends over the parts."""
