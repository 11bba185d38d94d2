"""Child side of emulation.build.run_sanitized: load the sanitized extension and call the
test function. Runs with the sanitizer runtime in LD_PRELOAD."""

import base64
import importlib.util
import json
import pickle
import sys


def main(spec_path: str) -> int:
    with open(spec_path) as f:
        spec = json.load(f)
    sys.path[:0] = [p for p in spec["sys_path"] if p not in sys.path]
    import torch

    torch.ops.load_library(spec["so"])
    from emulation.build import EmulatedOps

    ops = EmulatedOps(spec["namespace"], spec["so"], spec["sanitizer"])
    mod_spec = importlib.util.spec_from_file_location("_sk_emu_sanitized_target", spec["module_file"])
    module = importlib.util.module_from_spec(mod_spec)
    sys.modules[mod_spec.name] = module
    mod_spec.loader.exec_module(module)
    func = module
    for part in spec["qualname"].split("."):
        func = getattr(func, part)
    args = pickle.loads(base64.b64decode(spec["args"]))
    func(ops, *args)
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
