"""Rank 1 raises while the others wait in collectives: the whole job must end, showing the error."""

import torch

import tp_runtime

MESSAGE = "deliberate failure on rank 1 alone"


def main() -> None:
    world = tp_runtime.init()
    if world.rank == 1:
        raise RuntimeError(MESSAGE)
    while True:  # rank 1 never joins: without the abort this would hang forever
        world.tp_comm.all_reduce(torch.ones(8, device=world.device))
        world.tp_comm.barrier()


if __name__ == "__main__":
    main()
