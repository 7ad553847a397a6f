#!/usr/bin/env bash
# The GPU check, run once on a machine with a CUDA GPU from the repository root (the package need not be
# installed): the cuda-marked tests, the demo, a short Multi30k recipe and its decoding in fp32 and bf16.
#   bash bench/gpu.sh [DATA_DIR]      DATA_DIR holds multi30k/ (default ../shared/data)
set -uo pipefail
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}"
DATA=${1:-../shared/data}/multi30k
OUT=${OUT:-$(mktemp -d)}
py=${PYTHON:-python3}
echo "## machine"
nvidia-smi -L
$py -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"
echo "## cuda-marked tests (the demo runs below, as a user runs it)"
$py -m pytest -m cuda -q -p no:cacheprovider -rs --durations=5 --deselect tests/test_cuda.py::test_demo_on_the_gpu
echo "## transformer demo --device cuda"
/usr/bin/time -f "%e s wall" $py -m transformer demo --device cuda --out "$OUT/demo"
echo "## Multi30k recipe, 1.5 minutes on the GPU"
/usr/bin/time -f "%e s wall" $py -m transformer train configs/multi30k-en-de.yaml --device cuda --out "$OUT/m30k" \
  --max-minutes 1.5 --json --set data.train_src="$DATA/train.en" --set data.train_tgt="$DATA/train.de" \
  --set data.val_src="$DATA/val.en" --set data.val_tgt="$DATA/val.de" 2>&1 | grep -v "it/s\]\|step/s\]"
echo "## test2016, beam 5: fp32, then --bf16"
for flag in "" "--bf16"; do
  $py -m transformer evaluate "$OUT/m30k/averaged" --src "$DATA/test2016.en" --ref "$DATA/test2016.de" --beam 5 \
    --device cuda --json $flag
done
echo "## decoding speed, fp32 and bf16"
$py bench/gpu_decode.py
