"""Applications built on the toolkit: the ``rebasin`` command line, the demo, datasets, small models and
training helpers. Not re-exported by ``import rebasin``; import the submodules
(``rebasin.apps.models``, ``rebasin.apps.data``, ``rebasin.apps.training``, ``rebasin.apps.demo``,
``rebasin.apps.cli``).
"""
