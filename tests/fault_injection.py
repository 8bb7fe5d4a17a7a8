"""Run entry points until the save-protocol fault hook kills them: ``python -m tests.fault_injection PLAN.json``.

The plan is a JSON list of ``{"entry": "train" | "convert" | "write", "argv": [...], "fault": "point@n",
"no_exchange": bool}``. This process imports everything once, then forks one child per item (it runs
no tensor code itself, so forking is safe); each child sets ``PARARNN_CHECKPOINT_FAULT`` and runs
the entry point, which the hook SIGKILLs. Prints one JSON line per item: ``{"index", "killed"}``.
``no_exchange`` makes the file system look unable to exchange folders, so the rename fallback runs.

The ``write`` entry is a torch-free checkpoint writer: ``argv = [out, version]`` writes a folder
whose config and tensor both carry ``version``, for checking that a folder is one whole version.
"""

from __future__ import annotations

import json
import os
import signal
import sys


def write_version(out: str, version: int):
    import numpy as np
    from safetensors.numpy import save_file

    from pararnn_core import checkpoint

    checkpoint.write_checkpoint(
        out, {"version": version}, {"w": np.full(64, version, dtype=np.float32)},
        save_shard=lambda t, path, metadata: save_file(t, path, metadata=metadata),
        nbytes=lambda a: a.nbytes, dtype_name=lambda a: "F32", files={"note.txt": f"v{version}".encode()},
        force=True,
    )


def _run(item: dict) -> int:
    from pararnn_core import atomic_fs, safe_folder

    if item.get("no_exchange"):
        def unsupported(a, b):
            raise atomic_fs.NotSupported(95, "exchange disabled by the test")

        atomic_fs.exchange = unsupported
    os.environ[safe_folder.FAULT_ENV] = item["fault"]
    if item["entry"] == "train":
        from pararnn_torch.train import main

        return main(item["argv"])
    if item["entry"] == "convert":
        from pararnn_convert.cli import main

        return main(item["argv"])
    write_version(item["argv"][0], int(item["argv"][1]))
    return 0


def main(plan_path: str):
    plan = json.loads(open(plan_path).read())
    entries = {item["entry"] for item in plan}
    if "train" in entries:
        import matplotlib.pyplot  # noqa: F401  (imported once here, not in every child)

        import pararnn_torch.train  # noqa: F401
    if "convert" in entries:
        import pararnn_convert.cli  # noqa: F401
        import pararnn_convert.from_apple  # noqa: F401
    for index, item in enumerate(plan):
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            try:
                code = _run(item)
            except BaseException as e:  # reported, so the test shows why the hook was not reached
                print(f"child {index} raised {e!r}", file=sys.stderr)
                code = 3
            sys.stdout.flush()
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        print(json.dumps({"index": index, "killed": killed}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
