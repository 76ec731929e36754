"""The recipes that train the zoo's models (``mmskip/zoo/models/NAME``); not part of the installed package.

Run one from a clone with ``mmskip zoo NAME`` (or ``python -m recipes NAME`` in the clone's root);
:mod:`recipes.zoo` maps each zoo name to its recipe. A recipe builds its model with the zoo's
library modules (``mmskip.zoo.*_model``, the ``*_data`` generators), trains it, measures it and
writes the ``from_pretrained`` folder with its model card. Installed code never imports a recipe:
``mmskip.cli.recipe(name)`` loads one from the clone (as ``mmskip_recipes.<name>``), for the CLI
and the tests.
"""
