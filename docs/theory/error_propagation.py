"""Experiment 2 of issue 28: does the quantization error of a hierarchy propagate as Eq. 15 models it?

Eq. 15 (this project's completion, lightning_qmlhfl/theory/convergence.py) inflates the second moment of the cloud
update by prod_n (1 + rho_n q_n). Here the end-to-end relative error of one global round at the cloud,

    e2e = ||w_q - w_id||^2 / ||w_id - w_start||^2,

is measured for QSGD levels (s1, s2, s3) in {2, 8, 32}^3 against an identity-compressor engine fed the same
batches from the same state, next to the per-layer realised errors q_n (theory/compression_error_layer{n}) and
upload norms. Setup: MNIST, Dirichlet(0.5) over 64 devices, 784-200-10 ReLU MLP, SGD lr 0.05, batch 32,
Hierarchy.balanced([4, 4, 4]), taus [5, 4, 2] (40 local steps a round), QSGD bucket 512.

Protocol per seed: warm up the identity engine WARMUP rounds; then for r = 0..R-1 run the identity round r (this
is the trajectory that every round starts from: rounds continue from the IDENTITY state), and for each combo copy
the identity engine's start rows into the combo's compressed engine (one engine per combo, kept across rounds so
that its QSGD draws differ between rounds), run the same round's batches and compare the cloud models. Batches
are drawn with replacement from each device's shard, from a generator seeded by (seed, round). Optionally
(--accuracy) seed 0's combos are run R rounds *continuously compressed* from the warm-up state and evaluated on
the test set.

Command (2-core CPU, one thread), from the repository root:

    QMLHFL_THREADS=1 .venv/bin/python docs/theory/error_propagation.py --seeds 0 1 2 --rounds 3 --warmup 2 \
        --accuracy --out docs/theory/error_propagation.json

(``--analyse docs/theory/error_propagation.json`` recomputes only the summary block from the stored records.)
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lightning_qmlhfl import Hierarchy
from lightning_qmlhfl.compressors import QSGD, Identity
from lightning_qmlhfl.config import SimulationConfig
from lightning_qmlhfl.data.partition import Dirichlet
from lightning_qmlhfl.simulation.engine import QMLHFLEngine
from lightning_qmlhfl.theory.convergence import aggregation_ratios, lr_condition_terms
from recipes.datasets import load_mnist

torch.set_num_threads(int(os.environ.get("QMLHFL_THREADS", "1")))
H = Hierarchy.balanced([4, 4, 4])
N, TAUS, LR, BATCH, BUCKET = H.num_layers, [5, 4, 2], 0.05, 32, 512
RHO = aggregation_ratios(H, N)  # [1, 1/4, 1/4]
MEASURE = {"name": "measure", "rows": 8, "warn": False}


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(784, 200), nn.Linear(200, 10)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


def loss_fn(module, batch):
    x, y = batch
    return F.cross_entropy(module(x), y)


def make_engine(compressors, seed: int, measure: bool) -> QMLHFLEngine:
    torch.manual_seed(seed)
    cfg = SimulationConfig.build(hierarchy=H, taus=TAUS, compressors=compressors, executor="vmap", seed=seed,
                                 theory=MEASURE if measure else None)
    return QMLHFLEngine(MLP(), loss_fn, optimizer="sgd", optimizer_kwargs={"lr": LR}, config=cfg)


def round_indices(parts, seed: int, r: int, steps: int) -> torch.Tensor:
    """[steps, devices, BATCH] sample indices of global round r (with replacement within each device's shard)."""
    g = torch.Generator().manual_seed(10_000 * seed + r)
    return torch.stack([p[torch.randint(p.numel(), (steps, BATCH), generator=g)] for p in parts], 1)


def run_round(eng: QMLHFLEngine, X, Y, idx) -> dict:
    for t in range(idx.shape[0]):
        res = eng.local_step((X[idx[t]], Y[idx[t]]))
    assert res.round_completed
    return dict(eng.last_round_stats)


def snapshot(eng):
    return [p.clone() for p in eng.state.params], [b.clone() for b in eng.state.buffers]


@torch.no_grad()
def load_rows(eng, snap) -> None:
    for m in range(N + 1):
        eng.state.params[m].copy_(snap[0][m])
        eng.state.buffers[m].copy_(snap[1][m])


@torch.no_grad()
def accuracy(eng, Xt, Yt) -> float:
    return float((eng.load_cloud_into().eval()(Xt).argmax(1) == Yt).float().mean())


def layer_stats(st: dict, prefix: str = "") -> dict:
    return {f"{prefix}{k}": [float(st[f"theory/{k}_layer{n}"]) for n in range(1, N + 1)]
            for k in ("compression_error", "q_bound", "upload_norm")}


def _fit(A, b):
    coef = np.linalg.lstsq(A, b, rcond=None)[0]
    return coef, float(1 - ((A @ coef - b) ** 2).sum() / max(((b - b.mean()) ** 2).sum(), 1e-300))


def _quant_terms(q) -> float:
    """The quantization terms quant_1..quant_N of Eq. 15's bracket (this project's completion) for plain q_n."""
    return sum(v for key, v in lr_condition_terms(TAUS, [float(x) for x in q], H).items() if key.startswith("quant"))


def summarise(out: dict) -> dict:
    """The comparisons of the report: e2e against the product, bound, additive and independent-error models."""
    from scipy.stats import pearsonr, spearmanr
    recs, rho = out["records"], np.array(out["setup"]["rho"])
    # independent-error model (ours): layer n's errors add up at the cloud with weight 1/|layer n-1| each, over the
    # prod_{m>n} tau_m aggregations of layer n in a round: k_n = events_n / nodes_{n-1}
    k = np.array([math.prod(TAUS[n:]) / H.nodes_per_layer[n - 1] for n in range(1, N + 1)])
    e2e = np.array([r["e2e"] for r in recs])
    qh, qb = np.array([r["compression_error"] for r in recs]), np.array([r["q_bound"] for r in recs])
    U = np.array([r["upload_norm"] for r in recs])
    ident = [out["seeds"][str(r["seed"])]["identity_rounds"][r["round"]] for r in recs]
    d2 = np.array([i["update_norm2"] for i in ident])
    V_id = np.array([i["upload_norm"] for i in ident]) ** 2
    cost = k * U ** 2 / d2[:, None]  # the cloud's relative error per unit q_n of layer n (compressed run's norms)
    # propagated (ours, predictive): the noise D_n in layer n's uploads, from the identity run's norms and q_n:
    # D_1 = 0, D_{n+1} = tau_{n+1} / b_n (D_n + q_n (V_n,id + D_n)), tau_{N+1} = 1, b_n children per node; e2e = D_{N+1}
    D, b = np.zeros(len(recs)), [4, 4, 4]
    for n in range(N):
        D = (TAUS[n + 1] if n + 1 < N else 1) / b[n] * (D + qh[:, n] * (V_id[:, n] + D))
    models = {"product_measured": np.prod(1 + rho * qh, 1) - 1, "product_bound": np.prod(1 + rho * qb, 1) - 1,
              "additive_measured": (rho * qh).sum(1), "independent_errors": (cost * qh).sum(1),
              "independent_identity_norms": (k * V_id / d2[:, None] * qh).sum(1), "propagated_identity_norms": D / d2,
              "eq15_bracket_quant_terms": np.array([_quant_terms(q) for q in qh])}  # a scale-free comparison only
    combos = sorted({tuple(r["levels"]) for r in recs})
    cid = np.array([combos.index(tuple(r["levels"])) for r in recs])
    summ = {"independent_k": k.tolist(), "models": {}}
    for name, pred in models.items():
        per_combo = np.array([np.median(e2e[cid == c] / pred[cid == c]) for c in range(len(combos))])
        summ["models"][name] = {
            "pearson_log": float(pearsonr(np.log(e2e), np.log(pred))[0]), "spearman": float(spearmanr(e2e, pred)[0]),
            "ratio_median": float(np.median(per_combo)), "ratio_min": float(per_combo.min()),
            "ratio_max": float(per_combo.max()), "ratio_per_combo": dict(zip(map(str, combos), per_combo.tolist()))}
    L = np.log2(np.array([r["levels"] for r in recs], float))
    coef, r2 = _fit(np.c_[np.ones(len(L)), L], np.log(e2e))
    summ["loglevel_fit"] = {"slopes_per_doubling": coef[1:].tolist(), "intercept": float(coef[0]), "r2": r2}
    c, _ = _fit(qh / e2e[:, None], np.ones(len(e2e)))  # e2e ~ sum_n c_n q_n, fitted in relative error
    rel = (qh @ c - e2e) / e2e
    summ["per_unit_q_fit"] = {"c": c.tolist(), "rel_rms_error": float(np.sqrt((rel ** 2).mean())), "rho": rho.tolist(),
                              "independent_cost_identity_norms_median": np.median(k * V_id / d2[:, None], 0).tolist(),
                              "independent_cost_median": np.median(cost, 0).tolist()}
    summ["eq15_bracket_slope_per_unit_q_at_0"] = [_quant_terms(np.eye(N)[n] * 1e-9) / 1e-9 for n in range(N)]
    summ["upload_norm_median"] = np.median(U, 0).tolist()
    ident = [rd for sd in out["seeds"].values() for rd in sd["identity_rounds"]]
    summ["identity_upload_norm_median"] = np.median([rd["upload_norm"] for rd in ident], 0).tolist()
    summ["identity_update_norm_median"] = float(np.median([math.sqrt(rd["update_norm2"]) for rd in ident]))
    summ["upload_norm_median_by_s1"] = {str(2 ** int(a)): np.median(U[L[:, 0] == a], 0).tolist()
                                        for a in sorted(set(L[:, 0].tolist()))}
    levels = sorted({s for r in recs for s in r["levels"]})
    summ["q_measured_by_level"] = {str(s): [float(np.median(qh[L[:, n] == math.log2(s), n])) if
                                            (L[:, n] == math.log2(s)).any() else None for n in range(N)] for s in levels}
    summ["q_bound_by_level"] = {str(s): float(qb[L == math.log2(s)][0]) for s in levels}
    summ["e2e_median_per_combo"] = {str(cb): float(np.median(e2e[cid == i])) for i, cb in enumerate(combos)}
    return summ


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default="/work/shared/data")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--levels", type=int, nargs="+", default=[2, 8, 32])
    ap.add_argument("--combos", type=int, default=None, help="only the first k combos (for timing)")
    ap.add_argument("--accuracy", action="store_true", help="seed 0: test accuracy after R compressed rounds")
    ap.add_argument("--out", default=None)
    ap.add_argument("--analyse", default=None, help="only recompute the summary of this output file")
    args = ap.parse_args()
    if args.analyse:
        with open(args.analyse) as f:
            out = json.load(f)
        out["summary"] = summarise(out)
        print(json.dumps(out["summary"], indent=1))
        with open(args.out or args.analyse, "w") as f:
            json.dump(out, f, indent=1)
        return
    warnings.filterwarnings("ignore")  # the LearningRate/Compression warnings: their numbers are recorded here
    t0 = time.time()
    imgs, Y = load_mnist(args.root, train=True)
    X = imgs.reshape(len(Y), 784).float() / 255
    imgs_t, Yt = load_mnist(args.root, train=False)
    Xt = imgs_t.reshape(len(Yt), 784).float() / 255
    combos = list(itertools.product(args.levels, repeat=N))[: args.combos]
    steps = math.prod(TAUS)
    records, seeds_out, acc_out = [], {}, []
    for seed in args.seeds:
        parts = Dirichlet(alpha=0.5)(Y, H, seed=seed)
        ref = make_engine([Identity()] * N, seed, measure=True)
        for r in range(args.warmup):
            run_round(ref, X, Y, round_indices(parts, seed, r, steps))
        warm = snapshot(ref)
        starts, ends, ref_stats, idxs = [], [], [], []
        for r in range(args.rounds):
            idx = round_indices(parts, seed, args.warmup + r, steps)
            starts.append(snapshot(ref))
            st = run_round(ref, X, Y, idx)
            assert all(torch.equal(p, ref.cloud_params().expand_as(p)) for p in ref.state.params)  # resynced
            ends.append(ref.cloud_params().clone())
            ref_stats.append({**layer_stats(st), "update_norm2": float((ends[-1] - starts[-1][0][N][0]).pow(2).sum()),
                              "sigma2": st.get("theory/sigma2"), "L": st.get("theory/L_max")})
            idxs.append(idx)
        seeds_out[seed] = {"identity_rounds": ref_stats, "identity_test_acc": accuracy(ref, Xt, Yt),
                           "warmup_test_acc": None, "device_samples": [int(p.numel()) for p in parts]}
        load_rows(ref, warm)
        seeds_out[seed]["warmup_test_acc"] = accuracy(ref, Xt, Yt)
        for combo in combos:
            tc = time.time()
            eng = make_engine([QSGD(s, bucket_size=BUCKET) for s in combo], seed, measure=True)
            for r in range(args.rounds):
                load_rows(eng, starts[r])
                w0 = eng.cloud_params().clone()
                assert torch.equal(w0, starts[r][0][N][0])  # the same start as the identity round
                st = run_round(eng, X, Y, idxs[r])
                wq, wid = eng.cloud_params(), ends[r]
                e2e = float((wq - wid).pow(2).sum() / (wid - w0).pow(2).sum())
                records.append({"seed": seed, "round": r, "levels": list(combo), "e2e": e2e,
                                "q_norm2_ratio": float((wq - w0).pow(2).sum() / (wid - w0).pow(2).sum()),
                                **layer_stats(st)})
            rec = records[-1]
            print(f"seed {seed} s={combo} e2e(last)={rec['e2e']:.4g} q={[round(q, 3) for q in rec['compression_error']]}"
                  f" ({time.time() - tc:.1f}s)", flush=True)
            if args.accuracy and seed == args.seeds[0]:
                load_rows(eng, warm)
                for r in range(args.rounds):
                    run_round(eng, X, Y, idxs[r])
                acc_out.append({"levels": list(combo), "test_acc": accuracy(eng, Xt, Yt)})
                print(f"   accuracy after {args.rounds} compressed rounds: {acc_out[-1]['test_acc']:.4f}", flush=True)
    out = {"setup": {"dataset": "MNIST", "partition": "Dirichlet(alpha=0.5)", "devices": H.num_devices,
                     "branching": [4, 4, 4], "taus": TAUS, "lr": LR, "batch": BATCH, "model": "MLP 784-200-10 ReLU",
                     "compressor": f"QSGD(s, bucket_size={BUCKET})", "levels": args.levels, "seeds": args.seeds,
                     "rounds": args.rounds, "warmup_rounds": args.warmup, "rho": RHO,
                     "continue_from": "identity", "threads": torch.get_num_threads(),
                     "machine": f"{platform.machine()} {os.cpu_count()}-core CPU", "torch": torch.__version__},
           "seeds": seeds_out, "records": records, "accuracy_seed0": acc_out,
           "wall_time_s": round(time.time() - t0, 1)}
    out = json.loads(json.dumps(out))  # the seeds' keys as strings, as read back
    out["summary"] = summarise(out)
    print(json.dumps({k: v for k, v in out["summary"].items() if k != "models"}, indent=1))
    print({m: {k: round(v, 3) for k, v in d.items() if k != "ratio_per_combo"} for m, d in out["summary"]["models"].items()})
    print(f"wall time {out['wall_time_s']} s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
