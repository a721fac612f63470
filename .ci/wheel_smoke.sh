#!/usr/bin/env bash
# Wheel smoke test: build the wheel, install it into a fresh venv, and use it from outside the repository.
# Catches files the package reads at run time but the wheel does not carry (data presets, the bundles, ...):
# from another folder, the monai-mae command runs synth, pretrain, finetune and export with tiny settings,
# and the exported bundle runs its inference with python -m monai.bundle run.
#   .ci/wheel_smoke.sh            (or: make wheel-smoke)
# PYTHON picks the interpreter of the fresh venv (default python3). Everything is written under a
# temporary folder, removed at the end (KEEP=1 keeps it); the repository is only read.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/monai_mae_wheel.XXXXXX")"
[ "${KEEP:-0}" = 1 ] || trap 'rm -rf "$WORK"' EXIT
start=$SECONDS
step() { echo "[wheel-smoke +$((SECONDS - start))s] $*"; }

# 1. Build from a copy of the files git knows (tracked + untracked, not ignored), so the build leaves
#    no build/ or *.egg-info in the working tree.
step "copying the source to $WORK/src"
mkdir -p "$WORK/src"
(cd "$REPO" && git ls-files -z --cached --others --exclude-standard \
    | tar --null --ignore-failed-read -T - -cf - 2>/dev/null) | tar -xf - -C "$WORK/src"

step "fresh venv ($PYTHON)"
"$PYTHON" -m venv "$WORK/venv"
PIP=("$WORK/venv/bin/python" -m pip --quiet)

step "building the wheel"
"${PIP[@]}" wheel --no-deps "$WORK/src" -w "$WORK/dist"
WHEEL="$(ls "$WORK"/dist/monai_mae-*.whl)"
"$WORK/venv/bin/python" - "$WHEEL" <<'EOF'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
for needed in ("monai_mae/data/presets/ct.json", "monai_mae/data/presets/mri.json",
               "monai_mae/bundles/mae_pretrain/configs/train.json", "monai_mae/bundles/mae_finetune/configs/train.json",
               "monai_mae/bundles/mae_finetune/configs/inference.json", "monai_mae/bundles/mae_finetune/LICENSE"):
    assert needed in names, f"{sys.argv[1]} lacks {needed}"
print(f"{sys.argv[1]}: {len(names)} files, presets and bundles included")
EOF

# 2. torch first: a bare torch requirement would pull the CUDA build (gigabytes).
step "installing torch==2.13.0, then the wheel with its dependencies"
"${PIP[@]}" install torch==2.13.0
"${PIP[@]}" install "$WHEEL"

# 3. Use it from another folder: no repository on sys.path, only the installed package.
mkdir -p "$WORK/run"
cd "$WORK/run"
step "import, presets, monai-mae synth: a tiny synthetic dataset"
"$WORK/venv/bin/python" - "$REPO" <<'EOF'
import sys
from pathlib import Path

import monai_mae
from monai_mae.data import data_preset_names, load_data_preset

repo = Path(sys.argv[1]).resolve()
where = Path(monai_mae.__file__).resolve()
assert repo not in where.parents, f"monai_mae imported from the repository ({where}), not from the wheel"
assert data_preset_names() == ["ct", "mri"], data_preset_names()
ct, mri = load_data_preset("ct"), load_data_preset("mri")
assert ct["modality"] == "ct" and ct["a_min"] == -175.0 and ct["a_max"] == 250.0, ct
assert mri["modality"] == "mri" and mri["pixdim"] == [1.0, 1.0, 1.0], mri
print(f"monai_mae from {where.parent}; presets ct and mri loaded")
EOF
MM="$WORK/venv/bin/monai-mae"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
"$MM" --version
"$MM" synth data --num 3 --num-validation 1 --shape 32 32 24

step "monai-mae pretrain: one tiny epoch (cpu), the bundle configs from the installed package"
cat > tiny_pretrain.json <<'EOF'
{
    "roi_size": [16, 16, 16], "patch_size": [8, 8, 8], "batch_size": 1, "num_samples": 1, "num_workers": 0,
    "warmup_epochs": 1, "val_interval": 1, "progress_bar": false,
    "network_def#hidden_size": 48, "network_def#mlp_dim": 96, "network_def#num_layers": 2, "network_def#num_heads": 4,
    "network_def#decoder_hidden_size": 32, "network_def#decoder_mlp_dim": 64, "network_def#decoder_num_layers": 1,
    "network_def#decoder_num_heads": 4
}
EOF
"$MM" pretrain --data data --out mae --epochs 1 --device cpu --config tiny_pretrain.json
test -s mae/models/model.pt || { echo "wheel smoke: no mae/models/model.pt" >&2; exit 1; }
"$WORK/venv/bin/python" - "$WORK/venv" <<'EOF'
import json
import sys
from pathlib import Path

from monai_mae.packaged import bundles_root

recorded = json.loads(Path("mae/run_settings.json").read_text())
assert recorded["bundle"] == "mae_pretrain" and recorded["config_files"][0] == "train.json", recorded
assert Path(sys.argv[1]).resolve() in bundles_root().resolve().parents, bundles_root()  # the wheel's own bundles
print(f"bundles from {bundles_root()}")
EOF

step "monai-mae finetune --pretrained mae/models/model.pt: one tiny epoch (cpu)"
cat > tiny_finetune.json <<'EOF'
{
    "roi_size": [16, 16, 16], "batch_size": 1, "num_samples": 1, "num_workers": 0, "warmup_epochs": 1,
    "val_interval": 1, "sw_batch_size": 1, "progress_bar": false, "vitseg#decoder_channels": [8, 8, 8]
}
EOF
"$MM" finetune --data data --out seg --pretrained mae/models/model.pt --epochs 1 --device cpu \
    --config tiny_finetune.json
test -s seg/models/model.pt || { echo "wheel smoke: no seg/models/model.pt" >&2; exit 1; }

step "monai-mae export seg bundle_out, then the exported bundle's inference.json with python -m monai.bundle run"
"$MM" export seg bundle_out
(cd bundle_out && "$WORK/venv/bin/python" -m monai.bundle run --config_file configs/inference.json \
    --meta_file configs/metadata.json --logging_file configs/logging.conf --bundle_root . \
    --dataset_dir "$WORK/run/data" --output_dir "$WORK/run/seg_out" --device cpu --num_workers 0)
ls seg_out/segmentations/*_seg.nii.gz >/dev/null || { echo "wheel smoke: no segmentation written" >&2; exit 1; }
step "passed"
