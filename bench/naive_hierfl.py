"""The naive baseline of ``bench/engine.py``: hierarchical FL written the way public HierFAVG-style code is (one
``nn.Module`` + ``torch.optim.SGD`` + shuffling ``DataLoader`` per device, Python loops over devices and nodes,
uploads as deep copies of state dicts, per-node QSGD with plain torch ops); ``bench/engine.py``'s docstring says
what it is compared with and how."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset
from workloads import BATCH, LEVELS, LR


def qsgd(v: torch.Tensor, s: int) -> torch.Tensor:
    """QSGD of one flat vector, plain torch ops (as a per-node upload in public code)."""
    norm = v.norm()
    if norm == 0:
        return torch.zeros_like(v)
    r = v.abs() / norm * s
    low = torch.floor(r)
    xi = low + (torch.rand_like(r) < (r - low)).float()
    return norm * torch.sign(v) * xi / s


def flatten_sd(sd: dict) -> torch.Tensor:
    return torch.cat([v.reshape(-1).float() for v in sd.values()])


def unflatten_sd(flat: torch.Tensor, like: dict) -> dict:
    out, off = {}, 0
    for k, v in like.items():
        out[k] = flat[off : off + v.numel()].view_as(v).clone()
        off += v.numel()
    return out


class Client:
    def __init__(self, model: nn.Module, dataset, indices: list[int], device: torch.device) -> None:
        self.model = model
        self.device = device
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=LR)
        self.loader = DataLoader(Subset(dataset, indices), batch_size=BATCH, shuffle=True)
        self.it = iter(self.loader)
        self.steps = 0

    def next_batch(self):
        try:
            return next(self.it)
        except StopIteration:
            self.it = iter(self.loader)
            return next(self.it)

    def local_update(self) -> None:
        x, y = self.next_batch()
        if self.device.type != "cpu":
            x, y = x.to(self.device), y.to(self.device)
        self.model.train()
        self.optimizer.zero_grad()
        loss = F.cross_entropy(self.model(x), y)
        loss.backward()
        self.optimizer.step()
        self.steps += 1

    def send(self) -> dict:
        return copy.deepcopy(self.model.state_dict())

    def receive(self, state: dict) -> None:
        self.model.load_state_dict(state)


class Server:
    """An edge server (any layer >= 1) or the cloud: a state dict, its children, its device count."""

    def __init__(self, state: dict) -> None:
        self.state = copy.deepcopy(state)
        self.children: list = []
        self.num_devices = 0


class NaiveHierFL:
    """HierFAVG-style multi-layer hierarchical FL with per-node QSGD; see the module docstring."""

    def __init__(self, model_fn, branching: list[int], taus: tuple[int, ...], X, Y, part,
                 device: torch.device = torch.device("cpu")) -> None:
        template = model_fn().to(device)
        init = copy.deepcopy(template.state_dict())
        dataset = TensorDataset(X, Y)  # host tensors: batches go to the device in Client.local_update
        self.clients = []
        for i in range(part.shape[0]):
            m = model_fn()
            m.load_state_dict(init)
            self.clients.append(Client(m.to(device), dataset, part[i].tolist(), device))
        self.taus = taus
        # Build the tree top-down: layers[0] = clients, layers[N] = [cloud].
        n_layers = len(branching)
        self.layers: list[list] = [[] for _ in range(n_layers + 1)]
        self.layers[n_layers] = [Server(init)]
        for depth, fan in enumerate(branching):  # depth 0: the cloud's children
            n = n_layers - depth  # parents' layer
            for parent in self.layers[n]:
                for _ in range(fan):
                    child = Server(init) if n - 1 > 0 else self.clients[len(self.layers[0])]
                    parent.children.append(child)
                    self.layers[n - 1].append(child)
        self._count(self.layers[n_layers][0])
        self.aggregations = [0] * n_layers  # uploads per layer, for the same-work check
        self.steps = 0

    def _count(self, node) -> int:
        if isinstance(node, Client):
            return 1
        node.num_devices = sum(self._count(c) for c in node.children)
        return node.num_devices

    @staticmethod
    def _state_of(node) -> dict:
        return node.send() if isinstance(node, Client) else copy.deepcopy(node.state)

    def aggregate(self, n: int) -> None:
        """Eq. 4/6 at every node of layer n: v_p += sum_c w_c Q(v_c - v_p); then push the model down (Eq. 5)."""
        for server in self.layers[n]:
            parent_flat = flatten_sd(server.state)
            acc = torch.zeros_like(parent_flat)
            for child in server.children:
                w = (1 if isinstance(child, Client) else child.num_devices) / server.num_devices
                diff = flatten_sd(self._state_of(child)) - parent_flat
                acc += w * qsgd(diff, LEVELS)
                self.aggregations[n - 1] += 1
            server.state = unflatten_sd(parent_flat + acc, server.state)
            self._push_down(server)

    def _push_down(self, server: Server) -> None:
        for child in server.children:
            if isinstance(child, Client):
                child.receive(copy.deepcopy(server.state))
            else:
                child.state = copy.deepcopy(server.state)
                self._push_down(child)

    def local_step(self) -> None:
        for c in self.clients:
            c.local_update()
        self.steps += 1
        period = 1
        for n, tau in enumerate(self.taus, start=1):
            period *= tau
            if self.steps % period != 0:
                break
            self.aggregate(n)
