"""The inspector: ``bnpass inspect`` (cli.py) and what it reads from the pass.

* ``capture``: what the backend keeps for the inspector while it compiles (snapshots of the Dynamo
  graph around each site, digests of the graphs handed to Inductor, Inductor's generated code);
  the only module here the pass itself imports.
* ``run`` (one compile and training step on a fake process group), ``target`` (TARGET strings to
  models), ``kernels`` (which generated kernels touch which site);
* ``render_text``, ``render_json``, ``render_graph`` (dot and html, laid out by ``render_layout``).

Importing this package imports none of them: the pass loads ``capture`` alone.
"""
