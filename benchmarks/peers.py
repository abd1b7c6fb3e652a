"""Train-step time of public PyTorch fast-weight implementations ("peers") beside ours, in one process.

    .venv/bin/python benchmarks/peers.py                        # H in {20, 50, 100}, batch 128, ART K=8
    .venv/bin/python benchmarks/peers.py --hidden 20 --steps 2  # smoke test
    .venv/bin/python benchmarks/peers.py --peers-dir DIR --only fastweights_ar

Writes benchmarks/results/peers.json (see benchmarks/record.py); `benchmarks/render.py` makes the table
of docs/benchmarks.md from it. Run it on an otherwise idle machine.

The peers' code is not part of this project. Each sits in its own folder under --peers-dir (default:
$FWSWEEP_PEERS, else ~/.cache/fwsweep/peers; filled by `benchmarks/get_peers.sh`), named owner+name,
as extracted from the repository at one commit,
with a SOURCE.json beside the files ({"repo", "url", "commit", "commit_date", "files"}); this script
imports the peer's module from there by path (importlib) and records repository and commit.

What is timed: both sides as full models on the same ART-shaped batch (K=8 pairs: T=19 token ids,
vocabulary 37, 10 classes; `art_shaped_batch` of benchmarks/models.py), token ids -> logits, with the
same train step: zero_grad + forward + cross-entropy + backward + Adam step, one torch thread, S=1.
- A peer published as a whole model (embedding, recurrence, head) runs as published.
- A peer published as a per-step cell runs unmodified inside `CellClassifier`: our model's embedding
  (37 x 100) and head (Linear(H, 100), ReLU, Linear(100, 10)) around a plain loop over the time steps
  that calls the peer's cell once per step with its own state (the loop is the one a user of the cell
  writes; the embedding is looked up once for all steps, as in ours).
- Ours: `build_model` with our default `fw_form: fused`, `fw_rnn` for the FW-RNN peers and `fw_lstm`
  with `memory: candidate` for the FW-LSTM peer, with the peer's initial weights copied in (biases
  that the peer splits in two are summed into our one), so both sides compute on the same numbers.
Each peer is paired with its own copy of ours; all configurations of one H are timed round-robin (one
step of each per round, `--steps` rounds after `--warmup` untimed steps) so that load from other
processes spreads evenly; the figure is the median CPU time of the step (time.thread_time: with one
torch thread the whole step, backward included, runs on the calling thread), wall time beside it.

Equivalence: each peer's equations are written out in PEERS below. In float64 the peer's weights are
copied into ours (with our options set to the peer's constants, e.g. forget_bias 0 for the FW-LSTM) and
the logits and the embedding's gradient of one batch are compared; the JSON reports the max abs
differences. A peer whose equations differ from ours (written out in `differences`) shows a large one:
it is timed all the same, and the table says so.

Shims: none of the peers needs one with torch 2.x on CPU: no `.cuda()` on the path taken (fw-exp's
`list_cuda` lives in its model.py, not used), no removed API on it (fw-exp's `self._backend`, gone
from torch, is called only by its plain RNNCell/LSTMCell, never called here; its `F.sigmoid` still
exists and does not warn). The only adaptation is CellClassifier, wrapper code around unmodified cells.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import statistics
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from models import CLASSES, EMBED, HEAD, VOCAB, art_shaped_batch, time_round_robin, train_step_fn  # noqa: E402
from record import record  # noqa: E402

from sweep.models import build_model, count_parameters, params_class  # noqa: E402

FAST_LR, DECAY = 0.5, 0.9  # eta, lambda: ours' defaults, passed to every peer
SAME = 1e-12  # float64 max abs difference under which two models compute the same function


# ---------------------------------------------------------------------------------------------------
# Loading a peer's code from its extracted folder


@contextmanager
def on_path(folder: Path) -> Iterator[None]:
    """`folder` first on sys.path while a peer's module imports its siblings."""
    sys.path.insert(0, str(folder))
    try:
        yield
    finally:
        sys.path.remove(str(folder))


def load_file(name: str, path: Path) -> ModuleType:
    """Import the file at `path` as module `name` (its folder on sys.path for its own imports)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    with on_path(path.parent):
        spec.loader.exec_module(module)
    return module


def source(folder: Path) -> dict[str, Any]:
    path = folder / "SOURCE.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} missing: extract the peer with its SOURCE.json first")
    return json.loads(path.read_text())


# ---------------------------------------------------------------------------------------------------
# A per-step cell as a token -> logits model, like ours


class CellClassifier(nn.Module):
    """Our embedding and head around a peer's per-step cell; token ids [B, T] -> logits [B, 10].

    `step(cell, x_t, state) -> (h, state)` calls the cell once; `zero_state(B, like)` is its start state.
    """

    def __init__(self, cell: nn.Module, hidden: int, step: Callable, zero_state: Callable):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, EMBED)
        self.cell = cell
        self.head = nn.Sequential(nn.Linear(hidden, HEAD), nn.ReLU(), nn.Linear(HEAD, CLASSES))
        self.step, self.zero_state = step, zero_state

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        state = self.zero_state(x.shape[0], x)
        h = x.new_zeros(())
        for x_t in x.unbind(1):
            h, state = self.step(self.cell, x_t, state)
        return self.head(h)


def zeros_h_A(hidden: int) -> Callable:
    return lambda B, like: (like.new_zeros(B, hidden), like.new_zeros(B, hidden, hidden))


def zeros_h_c_A(hidden: int) -> Callable:
    return lambda B, like: (like.new_zeros(B, hidden), like.new_zeros(B, hidden),
                            like.new_zeros(B, hidden, hidden))


# ---------------------------------------------------------------------------------------------------
# The peers: how to build each, which of ours it is timed against, how its weights map onto ours


@torch.no_grad()
def copy_(dst: torch.Tensor, src: torch.Tensor) -> None:
    dst.copy_(src)


def copy_head(ours: nn.Module, peer_embed: nn.Module, peer_head: nn.Module) -> None:
    copy_(ours.embed.weight, peer_embed.weight)
    for i in (0, 2):
        copy_(ours.head[i].weight, peer_head[i].weight)
        copy_(ours.head[i].bias, peer_head[i].bias)


def copy_norm(dst: nn.LayerNorm, src: nn.LayerNorm) -> None:
    copy_(dst.weight, src.weight)
    copy_(dst.bias, src.bias)


def build_fastweights_ar(folder: Path, hidden: int) -> nn.Module:
    mod = load_file("peer_fastweights_ar_models", folder / "src" / "models.py")
    return mod.FastWeightsClassifier(vocab_size=VOCAB, emb_dim=EMBED, hidden_dim=hidden, num_classes=CLASSES,
                                     head_dim=HEAD, fw_eta=FAST_LR, fw_lam=DECAY, fw_S=1)


def to_ours_fastweights_ar(peer: nn.Module, ours: nn.Module) -> None:
    rec = ours.recurrent
    copy_head(ours, peer.emb, peer.head)
    copy_(rec.input_proj.weight, peer.U.weight)
    copy_(rec.input_proj.bias, torch.zeros_like(rec.input_proj.bias))  # the peer's U has no bias
    copy_(rec.recurrent.weight, peer.W.weight)
    copy_norm(rec.norm, peer.ln)


def build_core_rnn_fw(folder: Path, hidden: int) -> nn.Module:
    with on_path(folder / "KV_CLASS" / "fw_kv_exp_wait"):  # core_fw imports fw_kv.models.core_config
        core_fw = importlib.import_module("fw_kv.models.core_fw")
        cfg = importlib.import_module("fw_kv.models.core_config").CoreCfg(
            glimpse_dim=EMBED, hidden_dim=hidden, lambda_decay=DECAY, eta=FAST_LR, inner_steps=1,
            use_layernorm=True, use_A=True,
        )
    cell = core_fw.CoreRNNFW(cfg)

    def step(cell: nn.Module, x_t: torch.Tensor, state: tuple) -> tuple:
        h, A = cell(x_t, *state)
        return h, (h, A)

    return CellClassifier(cell, hidden, step, zeros_h_A(hidden))


def to_ours_core_rnn_fw(peer: nn.Module, ours: nn.Module) -> None:
    rec, cell = ours.recurrent, peer.cell
    copy_head(ours, peer.embed, peer.head)
    copy_(rec.input_proj.weight, cell.W_g.weight)
    copy_(rec.input_proj.bias, cell.b_h)
    copy_(rec.recurrent.weight, cell.W_h.weight)
    copy_norm(rec.norm, cell.ln_h)


def fw_exp_cells(folder: Path) -> ModuleType:
    return load_file("peer_fw_exp_rnn_cells", folder / "rnn_cells.py")  # imports fast_weight from folder


def step_fw_exp(cell: nn.Module, x_t: torch.Tensor, state: tuple) -> tuple:
    return cell(x_t, state)  # (output h, state)


def build_fw_exp_rnn(folder: Path, hidden: int) -> nn.Module:
    cell = fw_exp_cells(folder).FastWeightRNNCell(EMBED, hidden, nonlinearity="relu", lam=DECAY, eta=FAST_LR)
    return CellClassifier(cell, hidden, step_fw_exp, zeros_h_A(hidden))


def to_ours_fw_exp_rnn(peer: nn.Module, ours: nn.Module) -> None:
    rec, cell = ours.recurrent, peer.cell
    copy_head(ours, peer.embed, peer.head)
    copy_(rec.input_proj.weight, cell.inp_slow.weight)
    copy_(rec.input_proj.bias, cell.inp_slow.bias + cell.rec_slow.bias)
    copy_(rec.recurrent.weight, cell.rec_slow.weight)
    copy_norm(rec.norm, cell.ln)


def build_fw_exp_lstm(folder: Path, hidden: int) -> nn.Module:
    cell = fw_exp_cells(folder).FastWeightLSTMCell(EMBED, hidden, nonlinearity="relu", lam=DECAY, eta=FAST_LR)
    return CellClassifier(cell, hidden, step_fw_exp, zeros_h_c_A(hidden))


def to_ours_fw_exp_lstm(peer: nn.Module, ours: nn.Module) -> None:
    rec, cell = ours.recurrent, peer.cell
    copy_head(ours, peer.embed, peer.head)
    copy_(rec.input_proj.weight, cell.inp_slow.weight)  # gates i, f, o, g: our order i, f, o, j
    copy_(rec.input_proj.bias, cell.inp_slow.bias + cell.rec_slow.bias)
    copy_(rec.hidden_proj.weight, cell.rec_slow.weight)
    copy_norm(rec.gate_norm, cell.ln_ifog)
    copy_norm(rec.cell_norm, cell.ln_c)


@dataclass(frozen=True)
class Peer:
    key: str
    folder: str  # owner+name under --peers-dir
    entry: str  # the file and class used
    form: str  # "full model as published" or "cell in CellClassifier"
    implements: str  # the peer's equations (S = 1), read from its code
    ours: str
    ours_options: dict
    check_options: dict  # our options for the float64 comparison (the peer's constants)
    differences: str  # from ours, "" when none
    build: Callable[[Path, int], nn.Module] = field(repr=False)
    to_ours: Callable[[nn.Module, nn.Module], None] = field(repr=False)
    shims: str = "none"


FW_RNN = {"fw_form": "fused"}
FW_LSTM_CANDIDATE = {"memory": "candidate", "fw_form": "fused"}

PEERS: list[Peer] = [
    Peer(
        key="fastweights_ar",
        folder="date333cs+fastweights_ar",
        entry="src/models.py: FastWeightsClassifier",
        form="full model as published (embedding 100, head 100)",
        implements="u = W h(t) + U x(t); h_0 = ReLU(u); h_1 = ReLU(LN(u + A(t) h_0)); h(t+1) = h_1; "
        "A(t+1) = λ A(t) + η h(t+1) h(t+1)ᵀ, A a [B, H, H] tensor (Ba et al. 2016)",
        ours="fw_rnn",
        ours_options=FW_RNN,
        check_options=FW_RNN,
        differences="",
        build=build_fastweights_ar,
        to_ours=to_ours_fastweights_ar,
    ),
    Peer(
        key="FastWeights CoreRNNFW",
        folder="akinori020321+FastWeights",
        entry="KV_CLASS/fw_kv_exp_wait/fw_kv/models/core_fw.py: CoreRNNFW",
        form="cell in CellClassifier",
        implements="base = W_h h(t) + W_g x(t) + b; h_0 = ReLU(base); h_1 = ReLU(LN(base + A(t) h_0)); "
        "A(t+1) = λ A(t) + η h_1 h_1ᵀ, A a [B, H, H] tensor (cloned each step)",
        ours="fw_rnn",
        ours_options=FW_RNN,
        check_options=FW_RNN,
        differences="",  # at the pinned commit fd0f7e7 (benchmarks/get_peers.sh); from bf92041 on, the
        # repository adds a layer norm to the preliminary vector, h_0 = ReLU(LN(base)): another function
        build=build_core_rnn_fw,
        to_ours=to_ours_core_rnn_fw,
    ),
    Peer(
        key="fw-exp FastWeightRNNCell",
        folder="caseus-viridis+fw-exp",
        entry="rnn_cells.py: FastWeightRNNCell",
        form="cell in CellClassifier",
        implements="z = W h(t) + b_W + C x(t) + b_C; u = ReLU(z); A(t+1) = λ A(t) + η u uᵀ; "
        "h(t+1) = ReLU(LN(z + A(t+1) u)), A a [B, H, H] tensor",
        ours="fw_rnn",
        ours_options=FW_RNN,
        check_options=FW_RNN,
        differences="writes the preliminary vector u into A before reading it, and A holds the u's, not "
        "the h's (ours 'ba' reads A(t), built from h(1..t)); our variant 'authors' writes u first too "
        "but its inner loop uses W u + C x, not W h + C x: neither of ours is this function",
        build=build_fw_exp_rnn,
        to_ours=to_ours_fw_exp_rnn,
    ),
    Peer(
        key="fw-exp FastWeightLSTMCell",
        folder="caseus-viridis+fw-exp",
        entry="rnn_cells.py: FastWeightLSTMCell",
        form="cell in CellClassifier",
        implements="[î, f̂, ô, ĝ] = LN(W h(t-1) + U x(t) + b); r = ReLU(ĝ); A(t) = λ A(t-1) + η r rᵀ; "
        "c(t) = LN_c(σ(f̂) c(t-1) + σ(î) ReLU(ĝ + A(t) r)); h(t) = σ(ô) ReLU(c(t)), A a [B, H, H] tensor "
        "(Keller et al. 2018, fast weights on the candidate only)",
        ours="fw_lstm",
        ours_options=FW_LSTM_CANDIDATE,
        check_options={**FW_LSTM_CANDIDATE, "forget_bias": 0.0},
        differences="no forget bias (ours adds forget_bias, 1 by default; compared with 0, timed with 1)",
        build=build_fw_exp_lstm,
        to_ours=to_ours_fw_exp_lstm,
    ),
]


# ---------------------------------------------------------------------------------------------------
# Measurement


def build_pair(peer: Peer, folder: Path, hidden: int, options: dict, dtype: torch.dtype
               ) -> tuple[nn.Module, nn.Module]:
    """The peer's model and ours with the peer's initial weights."""
    torch.manual_seed(0)
    theirs = peer.build(folder, hidden).to(dtype)
    ours = build_model(params_class(peer.ours)(hidden_size=hidden, **options), VOCAB, CLASSES).to(dtype)
    peer.to_ours(theirs, ours)
    return theirs, ours


def compare(peer: Peer, folder: Path, hidden: int, batch: int, pairs: int) -> dict[str, float]:
    """Max abs difference of the logits and of the embedding's gradient, float64, same weights."""
    theirs, ours = build_pair(peer, folder, hidden, peer.check_options, torch.float64)
    x, y = art_shaped_batch(batch, pairs, seed=1)
    out = {}
    logits = []
    for model in (theirs, ours):
        z = model(x)
        F.cross_entropy(z, y).backward()
        logits.append(z.detach())
    out["logits_max_abs_diff"] = (logits[0] - logits[1]).abs().max().item()
    embeds = [m.emb if hasattr(m, "emb") else m.embed for m in (theirs, ours)]
    out["embed_grad_max_abs_diff"] = (embeds[0].weight.grad - embeds[1].weight.grad).abs().max().item()
    return out


@dataclass
class Row:
    peer: str
    repo: str
    commit: str
    hidden_size: int
    ours: str
    ours_options: str
    peer_params: int
    ours_params: int
    peer_cpu_ms: float
    ours_cpu_ms: float
    peer_wall_ms: float
    ours_wall_ms: float
    speedup: float  # peer CPU ms / ours CPU ms
    logits_max_abs_diff: float | None
    embed_grad_max_abs_diff: float | None
    same_function: bool | None


def bench_hidden_size(peers: list[tuple[Peer, Path, dict]], hidden: int, batch: int, pairs: int, steps: int,
                      warmup: int, check: bool) -> list[Row]:
    x, y = art_shaped_batch(batch, pairs)
    built = []  # (peer, folder, source, [peer step, ours step], models)
    for peer, folder, src in peers:
        theirs, ours = build_pair(peer, folder, hidden, peer.ours_options, torch.float32)
        fns = [train_step_fn(theirs, x, y), train_step_fn(ours, x, y)]
        for fn in fns:
            for _ in range(warmup):
                fn()
        built.append((peer, folder, src, fns, (theirs, ours)))
    timings = time_round_robin([fn for *_, fns, _models in built for fn in fns], steps)  # peer, ours, ...
    rows = []
    for i, (peer, folder, src, _fns, (theirs, ours)) in enumerate(built):
        (peer_cpu, peer_wall), (ours_cpu, ours_wall) = timings[2 * i : 2 * i + 2]
        diff = compare(peer, folder, hidden, batch, pairs) if check else {}
        peer_ms, ours_ms = 1e3 * statistics.median(peer_cpu), 1e3 * statistics.median(ours_cpu)
        worst = max(diff["logits_max_abs_diff"], diff["embed_grad_max_abs_diff"]) if diff else None
        rows.append(Row(
            peer=peer.key, repo=src["repo"], commit=src["commit"], hidden_size=hidden, ours=peer.ours,
            ours_options=", ".join(f"{k}={v}" for k, v in peer.ours_options.items()),
            peer_params=count_parameters(theirs), ours_params=count_parameters(ours),
            peer_cpu_ms=peer_ms, ours_cpu_ms=ours_ms,
            peer_wall_ms=1e3 * peer_wall, ours_wall_ms=1e3 * ours_wall,
            speedup=peer_ms / ours_ms,
            logits_max_abs_diff=diff.get("logits_max_abs_diff"),
            embed_grad_max_abs_diff=diff.get("embed_grad_max_abs_diff"),
            same_function=None if worst is None else worst <= SAME,
        ))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers-dir", type=Path,
                        default=Path(os.environ.get("FWSWEEP_PEERS") or Path.home() / ".cache/fwsweep/peers"),
                        help="one owner+name folder per peer, from benchmarks/get_peers.sh (default "
                        "$FWSWEEP_PEERS or ~/.cache/fwsweep/peers)")
    parser.add_argument("--only", nargs="+", metavar="PEER",
                        help=f"peer keys: {', '.join(p.key for p in PEERS)}")
    parser.add_argument("--hidden", type=int, nargs="+", default=[20, 50, 100])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--pairs", type=int, default=8, help="ART K; T = 2K + 3")
    parser.add_argument("--steps", type=int, default=15, help="timed rounds per hidden size")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per configuration first")
    parser.add_argument("--no-check", action="store_true", help="skip the float64 comparison with ours")
    parser.add_argument("--name", default="peers", help="results file benchmarks/results/NAME.json")
    args = parser.parse_args()
    torch.set_num_threads(1)

    chosen = [p for p in PEERS if not args.only or p.key in args.only]
    if args.only and len(chosen) != len(args.only):
        parser.error(f"unknown peer in {args.only}; known: {', '.join(p.key for p in PEERS)}")
    peers = []
    for peer in chosen:
        folder = args.peers_dir / peer.folder
        if not folder.is_dir():
            print(f"skipping {peer.key}: {folder} not found", file=sys.stderr)
            continue
        peers.append((peer, folder, source(folder)))
    if not peers:
        parser.error(f"no peer found under {args.peers_dir}")

    with record(args.name, vars(args), kind="peers") as payload:
        rows = []
        for h in args.hidden:
            rows += bench_hidden_size(peers, h, args.batch, args.pairs, args.steps, args.warmup,
                                      check=not args.no_check)
        payload["results"] = {
            "batch": args.batch,
            "length": 2 * args.pairs + 3,
            "inner_steps": 1,
            "fast_lr": FAST_LR,
            "decay": DECAY,
            "same_function_below": SAME,
            "peers": [
                {**{k: v for k, v in asdict(peer).items() if k not in ("build", "to_ours")}, **src}
                for peer, _folder, src in peers
            ],
            "steps": [asdict(r) for r in rows],
        }
    for r in rows:
        same = {None: "not checked", True: "same function", False: "different function"}[r.same_function]
        print(f"H={r.hidden_size:3d} {r.peer:26s} {r.peer_cpu_ms:8.1f} ms  ours ({r.ours}) "
              f"{r.ours_cpu_ms:7.1f} ms  {r.speedup:5.2f}x  ({same}"
              + (f", max |diff| {r.logits_max_abs_diff:.1e})" if r.logits_max_abs_diff is not None else ")"))


if __name__ == "__main__":
    main()
