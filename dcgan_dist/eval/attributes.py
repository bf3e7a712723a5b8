"""A small CelebA-attribute classifier, trained on the shards' own labels, to score generated faces.

It picks the exemplars for the paper's face arithmetic (generate.py): among a pool of samples, the ones
that most clearly show a concept such as "Smiling,~Male". Plain torch: no ranks, no Accelerate.

Held out: every 10th image of the shards, in shard order. The file (`attributes.safetensors`, cached
next to the shards) holds the weights and, in its metadata, the resolution, the attribute names, the
digest of the manifest it was trained from (a set sharded again in place gets a new classifier), and the
held-out accuracy and balanced accuracy per attribute.
"""
from __future__ import annotations

import json
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
from dcgan_dist.fsutil import atomic_write_bytes

FORMAT = "dcgan-dist-attributes/1"
CACHE_NAME = "attributes.safetensors"


class AttributeNet(nn.Module):
    """uint8-range images (B, 3, R, R), R >= 32 -> 40 attribute logits."""

    def __init__(self, width: int = 32, num_attributes: int = len(ATTRIBUTE_NAMES)):
        super().__init__()
        layers, c_in = [], 3
        for c_out in (width, width * 2, width * 4, width * 4):
            layers += [nn.Conv2d(c_in, c_out, 3, 2, 1, bias=False), nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2)]
            c_in = c_out                                     # state: c_out x R/2^k x R/2^k
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c_in, num_attributes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 127.5 - 1
        return self.head(self.features(x).mean(dim=(2, 3)))


def labelled_images(shards: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image of the shard set with its 40 attributes as 0/1: (N, 3, R, R) uint8, (N, 40) float."""
    images, labels = [], []
    for block, sample in ordered_blocks(ShardSet.open(shards)):
        if "json" not in sample:
            continue
        records = json.loads(sample["json"])
        if any("attributes" not in r for r in records):
            raise UserError(f"shards '{shards}' have no attribute labels (made from a plain image folder?); "
                            "the classifier needs shards made from CelebA's layout with list_attr_celeba.txt")
        images.append(block)
        labels += [[float(r["attributes"][n] > 0) for n in ATTRIBUTE_NAMES] for r in records]
    if not images:
        raise UserError(f"shards '{shards}': no readable images")
    return torch.from_numpy(np.concatenate(images)).permute(0, 3, 1, 2).contiguous(), torch.tensor(labels)


def train_classifier(shards: Path, epochs: int = 8, batch: int = 64, seed: int = 0,
                     progress: bool = True) -> tuple[AttributeNet, dict]:
    """Train on 9 of every 10 images; returns the net (eval mode) and its held-out report."""
    images, labels = labelled_images(Path(shards))
    held = torch.arange(len(images)) % 10 == 9
    x, y = images[~held], labels[~held]
    torch.manual_seed(seed)
    net = AttributeNet()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    loss_fn = nn.BCEWithLogitsLoss()
    steps = epochs * -(-len(x) // batch)
    bar = tqdm(total=steps, desc="training the attribute classifier", unit="step", disable=not progress)
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(batch):
            flip = torch.rand(len(idx)) < 0.5                 # mirror half the batch: faces are symmetric
            xb = torch.where(flip[:, None, None, None], x[idx].flip(-1), x[idx])
            loss = loss_fn(net(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()
    net.eval()
    return net, held_out_report(net, images[held], labels[held])


@torch.no_grad()
def held_out_report(net: AttributeNet, images: torch.Tensor, labels: torch.Tensor) -> dict:
    predicted = (torch.cat([net(b) for b in images.split(256)]) > 0).float()
    report = {"held_out_images": len(images), "attributes": {}}
    for i, name in enumerate(ATTRIBUTE_NAMES):
        pos, neg = labels[:, i] == 1, labels[:, i] == 0
        recall = lambda m: float((predicted[m, i] == labels[m, i]).float().mean()) if m.any() else float("nan")
        report["attributes"][name] = {
            "accuracy": float((predicted[:, i] == labels[:, i]).float().mean()),
            "balanced_accuracy": (recall(pos) + recall(neg)) / 2,       # 0.5 is chance, whatever the base rate
            "positive_rate": float(pos.float().mean())}
    return report


def save_classifier(path: Path, net: AttributeNet, shard_set: ShardSet, report: dict) -> None:
    from safetensors.torch import save

    meta = {"format": FORMAT, "resolution": str(shard_set.resolution), "attributes": json.dumps(list(ATTRIBUTE_NAMES)),
            "report": json.dumps(report), "manifest_digest": shard_set.digest}
    atomic_write_bytes(Path(path), save({k: v.contiguous() for k, v in net.state_dict().items()}, metadata=meta))


def load_classifier(path: Path) -> tuple[AttributeNet, dict]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"'{path}': not a readable attribute classifier ({str(exc).splitlines()[0][:120]})") from None
    if meta.get("format") != FORMAT:
        raise UserError(f"'{path}': not a dcgan-dist attribute classifier (format {meta.get('format')!r})")
    net = AttributeNet()
    net.load_state_dict(load_file(str(path)))
    return net.eval(), {"resolution": int(meta["resolution"]), "report": json.loads(meta["report"]),
                        "manifest_digest": meta.get("manifest_digest")}


def cached_path(shards: Path) -> Path:
    return Path(shards) / CACHE_NAME


def classifier_for(shards: Path, progress: bool = True) -> tuple[AttributeNet, dict]:
    """The classifier cached next to the shards, trained first if it is not there or was trained on
    another version of the set."""
    path, shard_set = cached_path(shards), ShardSet.open(shards)
    if path.is_file():
        net, meta = load_classifier(path)
        if meta["manifest_digest"] == shard_set.digest:
            return net, meta
        note(f"{path} was trained on another version of the shards; training it again")
    net, report = train_classifier(Path(shards), progress=progress)
    save_classifier(path, net, shard_set, report)
    return load_classifier(path)


@torch.no_grad()
def concept_scores(net: AttributeNet, images_u8: torch.Tensor, concept: list[tuple[str, bool]]) -> torch.Tensor:
    """Sum over the concept's attributes of log P(attribute as wanted): higher = shows it more clearly."""
    logp = torch.nn.functional.logsigmoid
    logits = torch.cat([net(b) for b in images_u8.split(256)])
    score = torch.zeros(len(images_u8))
    for name, present in concept:
        lg = logits[:, ATTRIBUTE_NAMES.index(name)]
        score += logp(lg) if present else logp(-lg)
    return score


def parse_concept(text: str) -> list[tuple[str, bool]]:
    """"Smiling,~Male" -> [("Smiling", True), ("Male", False)]; unknown names are a UserError."""
    out = []
    for part in (p.strip() for p in text.split(",")):
        name, present = (part[1:].strip(), False) if part.startswith("~") else (part, True)
        if name not in ATTRIBUTE_NAMES:
            raise UserError(f"--arithmetic: unknown attribute '{name}' in concept '{text.strip()}' "
                            f"(names as in list_attr_celeba.txt, e.g. Smiling, Male, Eyeglasses)")
        out.append((name, present))
    return out


def parse_expression(text: str) -> list[tuple[int, list[tuple[str, bool]]]]:
    """"A - B + C" -> [(+1, A), (-1, B), (+1, C)], each concept parsed: concepts joined by + and -."""
    import re

    parts = re.split(r"([+-])", text)
    concepts, ops = parts[0::2], ["+"] + parts[1::2]
    if any(not c.strip() for c in concepts) or any(not p.strip() for c in concepts for p in c.split(",")):
        raise UserError(f"--arithmetic: malformed expression {text!r}: expected concepts joined by + and -, "
                        "each a comma list of attribute names, ~ for absent, e.g. "
                        "\"Smiling,~Male - ~Smiling,~Male + ~Smiling,Male\"")
    return [(1 if op == "+" else -1, parse_concept(c)) for op, c in zip(ops, concepts)]


def scorer_for(shard_set: ShardSet) -> Optional[AttributeNet]:
    """The classifier cached next to a local shard set, for the W&B samples table; None, with one line
    saying why, when there is none to use (quietly for shards without attributes). Never trains one:
    on rank 0 mid-run that would hold every other rank."""
    def without(why: str) -> None:
        note(f"no W&B samples table: {why}")

    if not shard_set.manifest.get("attributes"):
        return None
    if shard_set.remote:
        return without(f"the attribute classifier is looked for next to local shards only, not at "
                       f"'{shard_set.shown}'")
    path = cached_path(Path(shard_set.location))
    if not path.is_file():
        return without(f"no attribute classifier at {path} (make one with "
                       f"`python launch/attributes.py --shards {shard_set.location}`)")
    net, meta = load_classifier(path)
    if meta["manifest_digest"] != shard_set.digest:
        return without(f"{path} was trained on another version of the shards; run launch/attributes.py again")
    return net


@torch.no_grad()
def probabilities(net: AttributeNet, images_u8: torch.Tensor) -> torch.Tensor:
    """(N, 40) P(attribute) for uint8 images on the CPU."""
    return torch.sigmoid(torch.cat([net(b) for b in images_u8.split(256)]))
