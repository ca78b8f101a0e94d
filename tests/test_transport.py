"""Point-to-point links between stages, on two plain gloo processes (no Ray): the header carries dtype and
shape, the stream ends on its end marker, every batch earns one credit back, and a producer never has more
than ``in_flight`` batches unacknowledged."""

import json
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vgim_dist.pipeline.transport import Receiver, Sender

IN_FLIGHT = 2
CONSUMER_DELAY_S = 1.5      # the consumer starts reading late: the producer must stop at its window


def batches() -> list[torch.Tensor]:
    """The same tensors in every process: each dtype the transport carries, and several ranks."""
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, 3, 5, generator=g), torch.randn(4, 7, generator=g).bfloat16(),
            torch.randn(1, 1, 9, generator=g).half(), torch.randn(3, generator=g), torch.randn(2, 3, 5, generator=g)]


def metrics(i: int) -> torch.Tensor:
    return torch.tensor([i, i + 0.5, -i], dtype=torch.float64)


def _worker(rank: int, init: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    control = dist.new_group(backend="gloo")
    dist.barrier()
    t0 = time.perf_counter()
    if rank == 0:
        sender = Sender(1, IN_FLIGHT, control)
        returned, depth = [], []
        for i, x in enumerate(batches()):
            sender.send(x, metrics(i))
            returned.append(time.perf_counter() - t0)
            depth.append(len(sender.outstanding))
        sender.close()
        result = {"returned": returned, "depth": depth, "left": len(sender.outstanding), "wait_s": sender.wait_s}
        with open(f"{out}.json", "w") as f:
            json.dump(result, f)
    else:
        time.sleep(CONSUMER_DELAY_S)
        received = list(Receiver(0, 3, torch.device("cpu"), control))
        torch.save(received, f"{out}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.timeout(180)  # a lost end of stream hangs the receiver: fail instead
def test_two_gloo_processes_exchange_batches_with_bounded_credit(tmp_path):
    out = str(tmp_path / "result")
    mp.spawn(_worker, args=(f"file://{tmp_path / 'rendezvous'}", out), nprocs=2, join=True)
    received = torch.load(f"{out}.pt")
    sent = json.loads(open(f"{out}.json").read())

    # Header: dtype and shape survive; the metrics vector travels with its batch. End: exactly 5 batches.
    assert len(received) == len(batches())
    for i, ((x, m), want) in enumerate(zip(received, batches())):
        assert x.dtype == want.dtype and x.shape == want.shape and torch.equal(x, want), i
        assert torch.equal(m, metrics(i)), i
    # Bounded window: never more than IN_FLIGHT unacknowledged; the first IN_FLIGHT sends do not wait, the
    # next one waits for the consumer's first credit.
    assert max(sent["depth"]) == IN_FLIGHT
    assert all(t < CONSUMER_DELAY_S - 0.5 for t in sent["returned"][:IN_FLIGHT])
    assert sent["returned"][IN_FLIGHT] > CONSUMER_DELAY_S - 0.3
    assert sent["wait_s"] > CONSUMER_DELAY_S - 0.3
    # Credits: one per batch, so closing the stream leaves nothing outstanding.
    assert sent["left"] == 0
