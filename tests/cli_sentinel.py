"""``--matcher-module cli_sentinel``: registers the ``sentinel`` matcher of :mod:`cli_factories`."""

from cli_factories import register_sentinel

register_sentinel()
