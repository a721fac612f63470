#!/usr/bin/env bash
# Wheel smoke test: build the wheel, install it into a fresh venv, and use it from outside the repository.
# Catches files the package reads at run time but the wheel does not carry (data presets, ...).
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
for needed in ("monai_mae/data/presets/ct.json", "monai_mae/data/presets/mri.json"):
    assert needed in names, f"{sys.argv[1]} lacks {needed}"
print(f"{sys.argv[1]}: {len(names)} files, presets included")
EOF

# 2. torch first: a bare torch requirement would pull the CUDA build (gigabytes).
step "installing torch==2.13.0, then the wheel with its dependencies"
"${PIP[@]}" install torch==2.13.0
"${PIP[@]}" install "$WHEEL"

# 3. Use it from another folder: no repository on sys.path, only the installed package.
mkdir -p "$WORK/run"
cd "$WORK/run"
step "import, presets, tiny synthetic dataset"
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
"$WORK/venv/bin/python" -m monai_mae.data.synthetic "$WORK/data" --num 3 --num-validation 1 --shape 32 32 24

step "one tiny epoch of the mae_pretrain bundle (cpu)"
B="$REPO/bundles/mae_pretrain/configs"
cat > "$WORK/tiny.json" <<'EOF'
{
    "roi_size": [16, 16, 16], "patch_size": [8, 8, 8], "batch_size": 1, "num_samples": 1, "num_workers": 0,
    "max_epochs": 1, "warmup_epochs": 1, "val_interval": 1, "progress_bar": false,
    "network_def#hidden_size": 48, "network_def#mlp_dim": 96, "network_def#num_layers": 2, "network_def#num_heads": 4,
    "network_def#decoder_hidden_size": 32, "network_def#decoder_mlp_dim": 64, "network_def#decoder_num_layers": 1,
    "network_def#decoder_num_heads": 4
}
EOF
OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" "$WORK/venv/bin/python" -m monai.bundle run \
    --config_file "['$B/train.json','$WORK/tiny.json']" --bundle_root "$REPO/bundles/mae_pretrain" \
    --meta_file "$B/metadata.json" --logging_file "$B/logging.conf" \
    --dataset_dir "$WORK/data" --output_dir "$WORK/out" --device cpu
test -s "$WORK/out/models/model.pt" || { echo "wheel smoke: no $WORK/out/models/model.pt" >&2; exit 1; }
step "passed"
