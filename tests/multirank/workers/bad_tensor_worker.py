"""Collectives reject bad tensors before communicating, naming what they expected and what they got."""

import numpy as np
import torch

import tp_runtime


def expect(exc_type, fragments, fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except exc_type as exc:
        missing = [f for f in fragments if f not in str(exc)]
        assert not missing, f"message lacks {missing}: {exc}"
    else:
        raise AssertionError(f"{fn.__name__}{args} did not raise {exc_type.__name__}")


def main() -> None:
    world = tp_runtime.init()
    comm, dev = world.tp_comm, world.device
    good = torch.ones(4, 4, device=dev)
    # Wrong device: CPU for NCCL; for MPI a meta tensor stands in (a CPU-only machine has no CUDA).
    wrong = torch.ones(4, 4, device="cpu" if dev.type == "cuda" else "meta")

    for name in ("all_reduce", "all_gather", "broadcast"):
        op = getattr(comm, name)
        expect(ValueError, [str(dev), str(wrong.device)], op, wrong)
        expect(TypeError, ["torch.float64", "torch.float32", "torch.bfloat16"], op, good.double())
        expect(ValueError, ["contiguous", "(4, 4)", "(1, 4)"], op, good.t())
        expect(TypeError, ["torch.Tensor", "ndarray"], op, np.ones(3, dtype=np.float32))
    expect(ValueError, ["root", f"[0, {comm.size})", f"got {comm.size}"], comm.broadcast, good, root=comm.size)

    # Nothing was sent by the failed calls: the group is still in step.
    assert torch.equal(comm.all_reduce(good.clone()), good * comm.size)
    print(f"PASS rank {world.rank}", flush=True)


if __name__ == "__main__":
    main()
