#!/usr/bin/env bash
# One command from a fresh clone: install peftmerge (CPU torch first) and merge the committed example
# adapters (MiniLM LoRA adapters trained by examples/multitask/run.py on sst2, agnews, mrpc and sms_spam).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet torch==2.13.0          # the CPU wheel; a plain `torch` pulls a CUDA build
python3 -m pip install --quiet -e ".[test]"
A=examples/adapters/minilm
peftmerge combine $A/sst2 $A/agnews $A/mrpc $A/sms_spam -o out/quickstart-ties --method ties --overwrite
peftmerge combine $A/sst2 $A/agnews $A/mrpc $A/sms_spam -o out/quickstart-ta --method task_arithmetic --lambda 0.5 --overwrite
peftmerge inspect $A/sst2 $A/agnews $A/mrpc $A/sms_spam
ls out/quickstart-ties out/quickstart-ties/heads
