"""The built-in circuit discovery methods, one module each, registered through the entry-point group
``circuitbench.methods`` (see pyproject.toml): ``ep`` (Edge Pruning), ``acdc``, ``eap``, ``eap-ig``
(EAP-IG-inputs), ``eap-ig-act`` (EAP-IG-activations), ``eap-mask-ig`` (mask-space IG), ``random`` and
``ensemble`` (several score methods combined). Use `circuitbench.method.get_method(name)`; nothing
imports these modules by name. Their micro-benchmarks (`methods.benchmarks`) are registered with
``circuitbench bench`` when the package is imported.
"""
from circuitbench.bench import Benchmark, register_benchmark

# the methods' micro-benchmarks (`methods.benchmarks`), run by ``circuitbench bench NAME``
register_benchmark(Benchmark("methods", "methods.benchmarks:methods_benchmark"))
register_benchmark(Benchmark("ep-step", "methods.benchmarks:ep_step_benchmark"))
register_benchmark(Benchmark("acdc-search", "methods.benchmarks:acdc_search_benchmark", default_model="smollm2-135m",
                             search=True))
