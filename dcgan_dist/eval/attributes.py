"""A small CelebA-attribute classifier, trained on the shards' own labels, to score generated faces: it
picks the exemplars for the paper's face arithmetic (generate.py) and fills the W&B samples table.

It holds out every 10th image in shard order. `attributes.safetensors`, cached next to the shards, holds
the weights and, in its metadata, the resolution, the digest of the manifest it was trained from (a set
sharded again in place gets a new classifier), and the held-out accuracies per attribute.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from dcgan_dist.data.celeba import ATTRIBUTE_NAMES
from dcgan_dist.data.shards import ShardSet
from dcgan_dist.data.stream import ordered_blocks
from dcgan_dist.errors import UserError, note
from dcgan_dist.fsutil import atomic_write_bytes, load_safetensors, safetensors_bytes

FORMAT = "dcgan-dist-attributes/1"
CACHE_NAME = "attributes.safetensors"


class AttributeNet(nn.Module):
    """uint8-range images (B, 3, R, R), R >= 32 -> 40 attribute logits."""

    def __init__(self, width: int = 32):
        super().__init__()
        layers, c_in = [], 3
        for c_out in (width, width * 2, width * 4, width * 4):
            layers += [nn.Conv2d(c_in, c_out, 3, 2, 1, bias=False), nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2)]
            c_in = c_out                                     # state: c_out x R/2^k x R/2^k
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c_in, len(ATTRIBUTE_NAMES))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images.float() / 127.5 - 1).mean(dim=(2, 3)))

    @torch.no_grad()
    def logits(self, images_u8: torch.Tensor) -> torch.Tensor:
        return torch.cat([self(b) for b in images_u8.split(256)])


def labelled_images(shard_set: ShardSet) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image of the shard set with its 40 attributes as 0/1: (N, 3, R, R) uint8, (N, 40) float."""
    images, labels = [], []
    for block, sample in ordered_blocks(shard_set):
        if "json" not in sample:
            continue
        records = json.loads(sample["json"])
        if any("attributes" not in r for r in records):
            raise UserError(f"shards '{shard_set.location}' have no attribute labels (made from a plain image "
                            "folder?); the classifier needs shards made from CelebA's layout with list_attr_celeba.txt")
        images.append(block)
        labels += [[float(r["attributes"][n] > 0) for n in ATTRIBUTE_NAMES] for r in records]
    if not images:
        raise UserError(f"shards '{shard_set.location}': no readable images")
    return torch.from_numpy(np.concatenate(images)).permute(0, 3, 1, 2).contiguous(), torch.tensor(labels)


def train_classifier(shard_set: ShardSet, epochs: int = 8, batch: int = 64) -> tuple[AttributeNet, dict]:
    """Train on 9 of every 10 images; returns the net (eval mode) and its held-out report."""
    images, labels = labelled_images(shard_set)
    held = torch.arange(len(images)) % 10 == 9
    x, y = images[~held], labels[~held]
    torch.manual_seed(0)
    net = AttributeNet()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    bar = tqdm(total=epochs * -(-len(x) // batch), desc="training the attribute classifier", unit="step")
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(batch):
            flip = torch.rand(len(idx)) < 0.5                 # mirror half the batch: faces are symmetric
            loss = nn.functional.binary_cross_entropy_with_logits(
                net(torch.where(flip[:, None, None, None], x[idx].flip(-1), x[idx])), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()
    net.eval()
    predicted, truth = (net.logits(images[held]) > 0).float(), labels[held]
    report = {"held_out_images": len(truth), "attributes": {}}
    for i, name in enumerate(ATTRIBUTE_NAMES):
        right = predicted[:, i] == truth[:, i]
        recall = lambda m: float(right[m].float().mean()) if m.any() else float("nan")
        report["attributes"][name] = {"accuracy": float(right.float().mean()),
                                      # 0.5 is chance, whatever the base rate
                                      "balanced_accuracy": (recall(truth[:, i] == 1) + recall(truth[:, i] == 0)) / 2,
                                      "positive_rate": float(truth[:, i].mean())}
    return net, report


def save_classifier(path: Path, net: AttributeNet, shard_set: ShardSet, report: dict) -> None:
    atomic_write_bytes(path, safetensors_bytes(net.state_dict(), {
        "format": FORMAT, "resolution": str(shard_set.resolution), "attributes": json.dumps(ATTRIBUTE_NAMES),
        "report": json.dumps(report), "manifest_digest": shard_set.digest}))


def load_classifier(path: Path) -> tuple[AttributeNet, dict]:
    meta, tensors = load_safetensors(path, FORMAT, "attribute classifier")
    net = AttributeNet()
    net.load_state_dict(tensors)
    return net.eval(), {"resolution": int(meta["resolution"]), "report": json.loads(meta["report"]),
                        "manifest_digest": meta.get("manifest_digest")}


def classifier_for(shards: Path) -> tuple[AttributeNet, dict]:
    """The classifier cached next to the shards, trained first if it is not there or was trained on
    another version of the set."""
    path, shard_set = Path(shards) / CACHE_NAME, ShardSet.open(shards)
    if path.is_file():
        net, meta = load_classifier(path)
        if meta["manifest_digest"] == shard_set.digest:
            return net, meta
        note(f"{path} was trained on another version of the shards; training it again")
    net, report = train_classifier(shard_set)
    save_classifier(path, net, shard_set, report)
    return load_classifier(path)


def concept_scores(net: AttributeNet, images_u8: torch.Tensor, concept: list[tuple[str, bool]]) -> torch.Tensor:
    """Sum over the concept's attributes of log P(attribute as wanted): higher = shows it more clearly."""
    logits = net.logits(images_u8)
    return sum(nn.functional.logsigmoid(logits[:, ATTRIBUTE_NAMES.index(name)] * (1 if present else -1))
               for name, present in concept)


def parse_expression(text: str) -> list[tuple[int, list[tuple[str, bool]]]]:
    """"A - B + C" -> [(+1, A), (-1, B), (+1, C)]: concepts joined by + and -, each a comma list of
    attribute names, ~ for absent ("Smiling,~Male" -> [("Smiling", True), ("Male", False)])."""
    parts = re.split(r"([+-])", text)
    concepts, ops = parts[0::2], ["+"] + parts[1::2]
    if any(not c.strip() for c in concepts) or any(not p.strip() for c in concepts for p in c.split(",")):
        raise UserError(f"--arithmetic: malformed expression {text!r}: expected concepts joined by + and -, "
                        "each a comma list of attribute names, ~ for absent, e.g. "
                        "\"Smiling,~Male - ~Smiling,~Male + ~Smiling,Male\"")
    out = []
    for op, concept in zip(ops, concepts):
        terms = [(p.strip()[1:].strip(), False) if p.strip().startswith("~") else (p.strip(), True)
                 for p in concept.split(",")]
        for name, _ in terms:
            if name not in ATTRIBUTE_NAMES:
                raise UserError(f"--arithmetic: unknown attribute '{name}' in concept '{concept.strip()}' "
                                f"(names as in list_attr_celeba.txt, e.g. Smiling, Male, Eyeglasses)")
        out.append((1 if op == "+" else -1, terms))
    return out


def scorer_for(shard_set: ShardSet) -> Optional[AttributeNet]:
    """The classifier cached next to a local shard set, for the W&B samples table; None, with one line
    saying why, when there is none to use (quietly for shards without attributes). Never trains one:
    on rank 0 mid-run that would hold every other rank."""
    if not shard_set.manifest.get("attributes"):
        return None
    path = Path(shard_set.location) / CACHE_NAME
    if shard_set.remote:
        why = f"the attribute classifier is looked for next to local shards only, not at '{shard_set.shown}'"
    elif not path.is_file():
        why = f"no attribute classifier at {path} (make one with `python launch/attributes.py --shards " \
              f"{shard_set.location}`)"
    else:
        net, meta = load_classifier(path)
        if meta["manifest_digest"] == shard_set.digest:
            return net
        why = f"{path} was trained on another version of the shards; run launch/attributes.py again"
    note(f"no W&B samples table: {why}")
    return None
