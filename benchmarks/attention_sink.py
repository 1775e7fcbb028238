"""How much of the lm teacher's state sits on each text's first token, layer by layer.

    python benchmarks/attention_sink.py [--domain tweets] [--texts 32] [--layers 2,6,10,14,22,26]

Loads SmolLM2-135M-Instruct as the lm task does, runs it on the first texts of a domain's
training part (the task's own tokens and padding), and prints per layer: the share of the
state's energy (sum of squares over real tokens) on the first token, the largest absolute
value there, and the root mean square of the other real tokens. A state whose energy is almost
all one token's (an attention sink's massive activation) makes an MSE on it a loss on one
number: why the layer pair matters for TD and the feature methods (docs/results.md).
"""

from __future__ import annotations

import argparse

import torch

from talkingmodels import taps
from talkingmodels.tasks import lm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--domain", default="tweets", choices=sorted(lm.DOMAINS))
    parser.add_argument("--texts", type=int, default=32)
    parser.add_argument("--layers", default="2,6,10,14,22,26")
    args = parser.parse_args()
    torch.set_num_threads(1)
    task = lm.LanguageModelling(lm.LMConfig())
    model, _ = task.teacher()
    input_ids, mask, _, (train, _, _) = task.data(args.domain)
    rows = train[: args.texts]
    ids, mask = input_ids[rows], mask[rows]
    names = [f"model.layers.{i}" for i in args.layers.split(",")]
    with torch.no_grad(), taps.capture(model, names) as states:
        model(input_ids=ids, attention_mask=mask)
    real = mask.bool()
    print(f"{args.texts} {args.domain} training texts; per layer (mean over texts):")
    for name in names:
        energy = states[name].pow(2).sum(-1) * real  # (texts, tokens)
        share = (energy[:, 0] / energy.sum(1)).mean()
        peak = states[name][:, 0].abs().amax(-1).mean()
        rest = states[name][:, 1:][real[:, 1:]]
        print(f"  {name:16s} first token: {100 * share:5.1f}% of the energy, max |x| {peak:7.0f}; "
              f"other tokens: RMS {rest.pow(2).mean().sqrt():5.1f}")


if __name__ == "__main__":
    main()
