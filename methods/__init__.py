"""The built-in circuit discovery methods, one module each, registered through the entry-point group
``circuitbench.methods`` (see pyproject.toml): ``ep`` (Edge Pruning), ``acdc``, ``eap``, ``eap-ig``
and ``random``. Use `circuitbench.method.get_method(name)`; nothing imports these modules by name.
"""
