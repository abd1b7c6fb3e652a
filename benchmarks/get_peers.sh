#!/usr/bin/env bash
# Put the public peers that benchmarks/peers.py times into DEST (default $FWSWEEP_PEERS, else
# ~/.cache/fwsweep/peers), OUTSIDE this repository: their code is never part of fwsweep. Each peer's
# files are taken at a pinned commit and a SOURCE.json (repo, url, commit, date, files) is written beside
# them. Source: a bare mirror under $PEER_MIRRORS/owner+name/repo if there is one (an offline machine),
# else a clone from GitHub.
#
#   benchmarks/get_peers.sh [DEST]
set -euo pipefail
dest_root=${1:-${FWSWEEP_PEERS:-$HOME/.cache/fwsweep/peers}}
mkdir -p "$dest_root"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

extract() {  # owner/name commit file...
  local repo=$1 commit=$2; shift 2
  local gitdir=${PEER_MIRRORS:-/nonexistent}/${repo/\//+}/repo
  if [ ! -d "$gitdir" ]; then
    gitdir=$tmp/${repo/\//+}.git
    git clone -q --bare --filter=blob:none "https://github.com/$repo" "$gitdir"
  fi
  local dest=$dest_root/${repo/\//+} date
  commit=$(git --git-dir="$gitdir" rev-parse "$commit^{commit}")
  date=$(git --git-dir="$gitdir" show -s --format=%cI "$commit")
  rm -rf "$dest"
  for f in "$@"; do
    mkdir -p "$dest/$(dirname "$f")"
    git --git-dir="$gitdir" show "$commit:$f" > "$dest/$f"
  done
  python3 - "$dest" "$repo" "$commit" "$date" "$@" <<'PY'
import json, sys
dest, repo, commit, date, *files = sys.argv[1:]
json.dump({"repo": repo, "url": f"https://github.com/{repo}", "commit": commit, "commit_date": date,
           "files": files}, open(f"{dest}/SOURCE.json", "w"), indent=1)
PY
  echo "$dest @ $commit"
}

# Ba et al.'s FW-RNN as a whole model; the same function as our fw_rnn (input bias 0)
extract date333cs/fastweights_ar 58348a2bfbbcc523a5b02622979d084acc401bd5 src/models.py README.md
# Ba et al.'s FW-RNN as a per-step cell; at this commit the same function as ours (a later commit adds an
# LN to the first inner step)
extract akinori020321/FastWeights fd0f7e7cc597072e175860432c99a5a8b29d7156 \
  KV_CLASS/fw_kv_exp_wait/fw_kv/models/core_fw.py KV_CLASS/fw_kv_exp_wait/fw_kv/models/core_config.py
# an FW-RNN cell with a different write/read order, and the FW-LSTM cell with candidate-only memory
extract caseus-viridis/fw-exp 3d09bc168ff162c390e3aef83e449d4df139c26d fast_weight.py rnn_cells.py LICENSE README.md
