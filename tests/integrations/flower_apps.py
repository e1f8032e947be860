"""A small Flower app (an MLP on a separable task) with lowbit's two lines, for the simulation
test. Module level, so Ray's workers import it by name."""
import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp
from flwr.serverapp.strategy import FedAvg

from lowbit.integrations.flower import KEY, LowbitStrategy, lowbit_mod


def model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 2))


def data(part: int, n: int = 128):
    g = torch.Generator().manual_seed(100 + part)
    x = torch.randn(n, 8, generator=g)
    return x, (x[:, 0] + 0.5 * x[:, 1] > 0).long()


def corrupt_mod(msg: Message, ctxt, call_next) -> Message:
    """Outside lowbit_mod: flips a byte of node ``partition-id == CORRUPT``'s frames on the way up."""
    reply = call_next(msg, ctxt)
    if ctxt.node_config.get("partition-id") == CORRUPT and reply.has_content() \
            and KEY in reply.content:
        rec = reply.content[KEY]
        b = bytearray(rec["frames"])
        b[len(b) // 2] ^= 0xFF
        rec["frames"] = bytes(b)
    return reply


CORRUPT = 3  # the partition whose frames arrive corrupted
client_app = ClientApp(mods=[corrupt_mod, lowbit_mod])


@client_app.train()
def train(msg: Message, ctxt) -> Message:
    m = model()
    m.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    x, y = data(int(ctxt.node_config["partition-id"]))
    opt = torch.optim.SGD(m.parameters(), lr=0.2)
    for _ in range(10):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(m(x), y)
        loss.backward()
        opt.step()
    content = RecordDict({"arrays": ArrayRecord(m.state_dict()),
                          "metrics": MetricRecord({"num-examples": len(y), "train_loss": float(loss)})})
    return Message(content, reply_to=msg)


def server(rounds: int):
    """(the LowbitStrategy, a dict holding the ServerApp under "app" and, after the run, the
    central accuracy and loss per round)."""
    strategy = LowbitStrategy(FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=4),
                              up_bits=3, down_bits=2)
    out: dict = {"accuracy": {}, "loss": {}}
    app = ServerApp()

    @app.main()
    def main(grid, ctxt) -> None:
        def central(rnd: int, arrays: ArrayRecord) -> MetricRecord:
            m = model()
            m.load_state_dict(arrays.to_torch_state_dict())
            x, y = data(999, 512)
            with torch.no_grad():
                logits = m(x)
            out["accuracy"][rnd] = float((logits.argmax(-1) == y).float().mean())
            out["loss"][rnd] = float(torch.nn.functional.cross_entropy(logits, y))
            return MetricRecord({"accuracy": out["accuracy"][rnd]})

        strategy.start(grid=grid, initial_arrays=ArrayRecord(model().state_dict()), num_rounds=rounds,
                       evaluate_fn=central)

    out["app"] = app
    return strategy, out
