"""`circuitbench methods [NAME] [--json]`: the registered circuit discovery methods.

Without a name: one line per method (name, what it produces, presets, description). With a name:
that method's hyperparameters under each preset (per-task entries of a preset listed below it).
"""
from __future__ import annotations

import dataclasses
import json

from ..method import get_method, list_methods


def add_parser(sub):
    p = sub.add_parser("methods", help="list the circuit discovery methods and their presets")
    p.add_argument("name", nargs="?", help="show one method's hyperparameters per preset")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def _plain(value):
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def _preset_configs(cls) -> dict:
    out = {}
    for preset in cls.presets:
        cfg = dataclasses.asdict(cls(preset=preset).config)
        out[preset] = {k: _plain(v) for k, v in cfg.items()}
    return out


def run(args) -> int:
    if args.name:
        cls = get_method(args.name)
        configs = _preset_configs(cls)
        if args.json:
            print(json.dumps({"name": cls.name, "description": cls.description, "produces": cls.produces,
                              "presets": configs}))
            return 0
        print(f"{cls.name}: {cls.description}")
        print(f"produces: {cls.produces}")
        for preset, cfg in configs.items():
            print(f"\npreset {preset}:")
            per_task = cfg.pop("per_task", None) or {}
            for key, value in cfg.items():
                print(f"  {key:<18} {value}")
            for task, entry in per_task.items():
                print(f"  on {task}: " + ", ".join(f"{k}={v}" for k, v in entry.items()))
        return 0
    methods = list_methods()
    if args.json:
        print(json.dumps([{"name": n, "description": c.description, "produces": c.produces,
                           "presets": list(c.presets)} for n, c in methods.items()]))
        return 0
    width = max(len(n) for n in methods) if methods else 4
    print(f"{'method':<{width}}  {'produces':<8}  {'presets':<18}  description")
    for name, cls in methods.items():
        print(f"{name:<{width}}  {cls.produces:<8}  {','.join(cls.presets):<18}  {cls.description}")
    return 0
