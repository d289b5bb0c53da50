"""The built-in circuit discovery methods, one module each, registered through the entry-point group
``circuitbench.methods`` (see pyproject.toml): ``ep`` (Edge Pruning), ``acdc``, ``eap``, ``eap-ig``
(EAP-IG-inputs), ``eap-ig-act`` (EAP-IG-activations), ``eap-mask-ig`` (mask-space IG), ``random`` and
``ensemble`` (several score methods combined). Use `circuitbench.method.get_method(name)`; nothing
imports these modules by name.
"""
