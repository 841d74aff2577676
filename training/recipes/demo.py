"""Recipe for the bundled demo model: dual encoders, then the fusion reranker, on the synthetic world.

    python -m itm.training.recipes.demo            # every stage; writes the demo bundle (data/demo/*.safetensors)
    python -m itm.training.recipes.demo --stage reranker --resume
    python -m itm.training.recipes.demo --work W --out W/bundle --stage reranker \
        --reranker-option random_negatives=0       # an experiment beside the bundled run: W holds
                                                   # synth/ and encoders/best/ (links to work/'s will do)

Stage "data" writes the synthetic dataset (train and val with confusable twin pairs; the test
split is never read). Stage "encoders" trains the `itm-demo` dual encoders from random weights
with the contrastive loss, each image's false caption joining the softmax as a negative where
it swaps attributes (colour, shape, size), and colour-swapped twins batched together. Relation
and position flips, and position-swapped twins, are kept out of its contrastive loss: a pooled
image embedding does not learn where things are here, and a caption that must score below its flip
on images that look the same to the encoder teaches the text tower to make "left" and "right"
alike, which leaves the reranker nothing to read them from. The encoder stage's region-word loss
(TrainOptions.region_words) has the image tower's tokens under each grounded phrase's cell predict
that phrase's words, one sigmoid per word: without it the tower coded a cell's colour and shape as
one conjoint code, and read a colour-shape pair held out of training as another shape of that
colour (benchmarks/region_probe.py). Stage "reranker" freezes the
encoders and trains the `fusion-demo` reranker with matching + ranking losses on mined, random
and named negatives (every false caption, both kinds of twins), and the grounding loss on each
mention's cell. What lets the reranker read relations is the encoder stage's token_margin:
relation and position flips are that stage's token negatives, kept 0.2 apart at every text layer
the reranker reads (itm.training.loss.token_separation_loss); without it nothing kept "left" and
"right" apart, and a run on another trajectory lost them. Before the reranker stage starts, the
recipe checks that the encoder's text tokens tell a caption from its relation flip
(check_relation_words). The encoder and reranker stages update with AdamW's fused kernel
(TrainOptions.fused_optimizer). Of their 5,000-step schedules the encoder stage runs 3,000 steps
and the reranker stage 4,000: the bundled run's best checkpoints lay at 2,750 and 4,000, its
encoders' next 1,250 steps brought nothing on val, nor did an earlier reranker run's next 500, at a
small learning rate. The learning-rate schedule spans all 5,000 steps either way, so the stop
changes no step before it. Stage "hard" fine-tunes that checkpoint for 500 steps of a 1,000-step schedule
(the bundled run's second 500 brought nothing) with each image batched with its twin and its
nearest images by the frozen encoders, so that the mined negatives are as close as the
candidates a search over a whole collection hands the reranker (a batch of random images holds
few such).
Both reranker stages run the fusion layers under bf16 autocast where the CPU computes in bf16
natively (AVX-512 BF16, AMX), fp32 elsewhere: a step costs about a seventh less. They run the
frozen encoders over each training image and text once, before the first step, and keep the
features (TrainOptions.feature_cache_gb) instead of encoding every batch: about 7% less a step.
Stage "robust" fine-tunes the image tower alone (itm.training.robust.harden_images) so that copies of
the training images shrunk and re-encoded as JPEG give the frozen encoder's features of the clean
image, embedding and the reranker's token layers both: the reranker, trained on clean features,
then reads degraded photos as it reads clean ones, and the text tower does not change. Its
validation figure is that feature error on the val images, clean and degraded (lower is better).
The stages are validated on the val split every EVAL_EVERY steps (the reranker's every
8 x EVAL_EVERY and at its last step, the hard stage's every 2 x EVAL_EVERY: a validation with
reranking costs them about 17 s) and stop when PATIENCE
validations in a row bring nothing better; the best checkpoint of each is what the next stage and
the bundle take. Stage "weight"
picks the weight of the match logit in the final score (recall cosine + weight x logit) from
WEIGHTS by the same validation figure (the val split scored once, each weight ranking the same
match logits), and the bundle's reranker carries it. Stage "calibrate"
fits the match probability (itm-calibrate, on val queries) beside the bundle. Stage "curves" plots
each stage's log.jsonl (losses and validation figures) to training_curves.png.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from itm.common.errors import ItmError
from itm.common.paths import demo_dir
from itm.data.synth.prepare import prepare
from itm.models.encoder import DualEncoder, cpu_has_native_bf16
from itm.models.fusion import get_fusion_config
from itm.models.fusion_checkpoint import load_reranker
from itm.models.registry import resolve_model
from itm.training.calibrate import calibrate_on_world
from itm.training.data import load_dataset
from itm.training.loss import token_distances
from itm.training.options import TrainOptions
from itm.training.robust import HardenOptions, harden_images
from itm.training.state import ENCODER_FILE, RERANKER_FILE
from itm.training.train import VAL_FIGURE, train, validate_weights

BUNDLE = demo_dir()  # where the bundle goes by default: the demo model itm loads (ITM_DEMO_DIR moves it)

SPLITS = {"train": 10_000, "val": 500}
SEED = 0
TWIN_FRACTION = 0.5  # share of train/val image pairs that are confusable twins
EVAL_EVERY, PATIENCE = 250, 6
# token_margin keeps relation words apart in the text tokens the reranker reads (check_relation_words);
# region_words has the image tower read each cell's colour, shape and size apart
STAGE1 = TrainOptions(train_encoders=True, train_reranker=False, fusion="fusion-demo", batch_size=128,
                      encoder_lr=1e-3, lr=1e-3, weight_decay=0.1, warmup_steps=100, max_steps=5000, stop_after=3000,
                      epochs=1000, seed=SEED, save_every=250, eval_every=EVAL_EVERY, patience=PATIENCE,
                      token_margin=0.2, region_words=1.0, fused_optimizer=True, progress=True)
# random_negatives=0 saves a sixth of the reranker stages' time, and costs held-out pairs' truth@1 (README)
STAGE2 = TrainOptions(fusion="fusion-demo", batch_size=64, lr=1e-3, warmup_steps=100, max_steps=5000,
                      stop_after=4000, epochs=1000, num_negatives=2, random_negatives=1, hard_negatives="sample",
                      seed=SEED, save_every=250, eval_every=8 * EVAL_EVERY, patience=PATIENCE, val_rerank_k=10,
                      precision="bf16" if cpu_has_native_bf16() else "fp32", fused_optimizer=True, progress=True)
STAGE3 = dataclasses.replace(STAGE2, lr=2e-4, warmup_steps=50, max_steps=1000, stop_after=500, neighbours=3,
                             eval_every=2 * EVAL_EVERY)
STAGE4 = HardenOptions(steps=1500, batch_size=128, lr=2e-4, warmup_steps=50, eval_every=EVAL_EVERY, seed=SEED,
                       progress=True)
RELATION_SPLIT = 0.05  # check_relation_words: below this, the text tower has washed relation words out
WEIGHTS = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)
STAGES = ("data", "encoders", "reranker", "hard", "robust", "weight", "bundle", "calibrate", "curves")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=BUNDLE / "work", help="dataset, checkpoints and logs")
    ap.add_argument("--out", type=Path, default=BUNDLE, help="where the bundle goes")
    ap.add_argument("--stage", choices=["all", *STAGES], default="all")
    ap.add_argument("--resume", action="store_true", help="continue a stage from its last checkpoint")
    ap.add_argument("--encoder-option", action="append", default=[], metavar="KEY=VALUE",
                    help="change a TrainOptions field of the encoder stage, for an experiment "
                         "(e.g. token_margin=0); repeat for several")
    ap.add_argument("--reranker-option", action="append", default=[], metavar="KEY=VALUE",
                    help="change a TrainOptions field of the reranker and hard stages, for an experiment "
                         "(e.g. random_negatives=0); repeat for several")
    args = ap.parse_args()
    global STAGE1, STAGE2, STAGE3
    try:
        STAGE1 = with_options(STAGE1, args.encoder_option)
        STAGE2, STAGE3 = (with_options(s, args.reranker_option) for s in (STAGE2, STAGE3))
    except ValueError as e:
        ap.error(str(e))
    t0 = time.time()
    dataset = args.work / "synth" / "dataset_karpathy.json"
    run = (lambda stage: args.stage in ("all", stage))
    timings = {}
    if run("data"):
        r = prepare(dataset.parent, SPLITS, SEED, image_size=64, captions_per_image=5, workers=2,
                    twin_fraction=TWIN_FRACTION)
        timings["data"] = r.seconds
        print(r)
    if any(map(run, ("encoders", "reranker", "hard", "robust", "weight"))):
        data, val = load_dataset(dataset, split="train"), load_dataset(dataset, split="val")
    if run("encoders"):
        r = train(resolve_model("itm-demo", "random"), attribute_negatives(data, dataset), args.work / "encoders",
                  STAGE1, resume=args.resume, val_data=val)
        timings["encoders"] = r.seconds
        print(f"encoders: {r.steps} steps in {r.seconds / 60:.1f} min, best at step {r.best_step}")
    encoder = args.work / "encoders" / "best" / ENCODER_FILE
    if run("reranker"):
        check_relation_words(encoder, dataset)
        r = train(resolve_model("itm-demo", checkpoint=encoder), data, args.work / "reranker", STAGE2,
                  resume=args.resume, val_data=val)
        timings["reranker"] = r.seconds
        print(f"reranker: {r.steps} steps in {r.seconds / 60:.1f} min, best at step {r.best_step}")
    if run("hard"):
        r = train(resolve_model("itm-demo", checkpoint=encoder), data, args.work / "hard",
                  dataclasses.replace(STAGE3, init_reranker=args.work / "reranker" / "best" / RERANKER_FILE),
                  resume=args.resume, val_data=val)
        timings["hard"] = r.seconds
        print(f"hard: {r.steps} steps in {r.seconds / 60:.1f} min, best at step {r.best_step}")
    reranker = args.work / "hard" / "best" / RERANKER_FILE
    if run("robust"):  # the image tower learns to give degraded images their clean features, for the same reranker
        layers = tuple(load_reranker(reranker).cfg.image_layers)
        r = harden_images(resolve_model("itm-demo", checkpoint=encoder), data, args.work / "robust",
                          dataclasses.replace(STAGE4, layers=layers), val_data=val)
        timings["robust"] = r.seconds
        print(f"robust: {r.steps} steps in {r.seconds / 60:.1f} min, best at step {r.best_step}")
    robust = args.work / "robust" / "best" / ENCODER_FILE
    weight_file = args.work / "hard" / "score_weight.json"
    if run("weight"):
        t_weight = time.time()
        weight_file.write_text(json.dumps(fit_score_weight(robust, reranker, val), indent=1) + "\n")
        timings["weight"] = time.time() - t_weight
    if run("bundle"):
        write_bundle(robust, reranker, json.loads(weight_file.read_text())["score_weight"], args.out)
    if run("calibrate"):  # the match probability behind --min-prob, fitted on val queries (itm-calibrate)
        cal, path = calibrate_on_world(resolve_model(str(args.out)), "val")
        print(f"calibrate: {path}: p = sigmoid({cal.a:.4f} * logit + {cal.b:.4f})")
    if run("curves"):
        plot_curves(args.work, args.out / "training_curves.png")
    minutes = (time.time() - t0) / 60
    print(f"done in {minutes:.1f} min ({', '.join(f'{k} {v / 60:.1f} min' for k, v in timings.items())})")


def with_options(opts: TrainOptions, pairs: list[str]) -> TrainOptions:
    """`opts` with the fields named in KEY=VALUE `pairs` set, each value read as the field's current type."""
    changes = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in {f.name for f in dataclasses.fields(TrainOptions)}:
            raise ValueError(f"--reranker-option {pair!r}: expected KEY=VALUE with KEY a TrainOptions field")
        current = getattr(opts, key)
        if isinstance(current, bool):
            if value.lower() not in ("true", "false"):
                raise ValueError(f"--reranker-option {pair!r}: {key} is true or false")
            changes[key] = value.lower() == "true"
        elif value.lower() == "none":
            changes[key] = None
        elif current is None or isinstance(current, str):
            changes[key] = _number_or_text(value)
        else:
            try:
                changes[key] = type(current)(value)
            except ValueError:
                raise ValueError(f"--reranker-option {pair!r}: {key} is a {type(current).__name__}") from None
    return dataclasses.replace(opts, **changes)


def _number_or_text(value: str) -> int | float | str:
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


RELATIONAL = ("relation_flip", "position_flip")  # negative kinds that only a spatially aware model can reject


def attribute_negatives(data: list, dataset: Path) -> list:
    """`data` without its relational negatives: false captions that flip a relation or a position move from
    `negatives` to `token_negatives` (kept apart in the text tokens only, where the encoder stage's
    token_margin asks), and position-swapped twins are no longer named as confusable images."""
    images = json.loads(dataset.read_text())["images"]
    where = lambda im: (dataset.parent / im["filepath"] / im["filename"]).resolve()  # noqa: E731
    flips = {where(im): {s["raw"].strip() for s in im["sentences"] if s.get("negative_kind") in RELATIONAL}
             for im in images}
    moved = {where(im) for im in images if im.get("twin_kind") == "position_swap"}
    relational = lambda d: [c in flips.get(d.image, ()) for c in d.captions]  # noqa: E731
    return [dataclasses.replace(
        d, negatives=tuple(None if r else n for r, n in zip(relational(d), d.negatives)),
        token_negatives=tuple(n if r else None for r, n in zip(relational(d), d.negatives)),
        hard_images=() if d.image in moved else d.hard_images) for d in data]


def relation_pairs(dataset: Path, split: str = "val") -> list[tuple[str, str]]:
    """Each caption of the split that has a relation flip, with its flip."""
    return [(s["raw"], s["negative"]) for im in json.loads(dataset.read_text())["images"] if im["split"] == split
            for s in im["sentences"] if s.get("negative_kind") == "relation_flip"]


def pair_distances(encoder: DualEncoder, pairs: list[tuple[str, str]], layers) -> torch.Tensor:
    """(layers, pairs): for each caption and its flip, the largest cosine distance between their features at
    any real token, per layer of `layers` (0 where the tower makes the two captions alike)."""
    n = len(pairs)
    enc = encoder.encode_texts([a for a, _ in pairs] + [b for _, b in pairs], layers)  # one call: one length
    return token_distances([t[:n] for t in enc.tokens], [t[n:] for t in enc.tokens], enc.mask[:n] & enc.mask[n:])


def relation_distance(encoder: DualEncoder, pairs: list[tuple[str, str]], layers) -> float:
    """How far apart the text tower keeps relation words where the reranker reads them: `pair_distances`'
    largest over the layers, averaged over the pairs."""
    return float(pair_distances(encoder, pairs, layers).amax(0).mean())


def check_relation_words(encoder: Path, dataset: Path) -> float:
    """Refuse an encoder whose text tower has washed relation words out (RELATION_SPLIT): the reranker reads
    its tokens and could not learn relations from them, and its stage would spend most of the recipe's time
    for nothing. The encoder stage keeps relation flips out of its contrastive loss, so without its
    token_margin (`--encoder-option token_margin=0`) nothing keeps "left" and "right" apart, and a run on
    some trajectories (the fused optimizer's, for one) loses them."""
    enc = DualEncoder.load(resolve_model("itm-demo", checkpoint=encoder))
    cfg = get_fusion_config(STAGE2.fusion, image_width=enc.image_width, text_width=enc.text_width)
    pairs = relation_pairs(dataset)
    if not pairs:
        raise ItmError(f"{dataset}: no val caption has a relation flip to check the encoder's text tower on")
    distance = relation_distance(enc, pairs, cfg.text_layers)
    print(f"encoders: relation words {distance:.3f} apart in the text tokens the reranker reads "
          f"({len(pairs)} val captions and their relation flips)")
    if distance < RELATION_SPLIT:
        raise ItmError(f"the encoder stage's text tower makes captions and their relation flips alike "
                       f"({distance:.4f} < {RELATION_SPLIT}): a reranker cannot learn relations from it; "
                       f"train the encoder stage again on the recipe's settings")
    return distance


def fit_score_weight(encoder: Path, reranker: Path, val) -> dict:
    """The weight of WEIGHTS whose fused score does best on the val split, with every weight's figures."""
    enc, model = DualEncoder.load(resolve_model("itm-demo", checkpoint=encoder)), load_reranker(reranker)
    figures = validate_weights(enc, model, val, STAGE2.val_rerank_k, WEIGHTS)
    for w in WEIGHTS:
        print(f"weight {w}: " + ", ".join(f"{k} {v:.1f}" for k, v in figures[w].items()))
    best = max(WEIGHTS, key=lambda w: figures[w][VAL_FIGURE])
    print(f"weight: {best} ({VAL_FIGURE} {figures[best][VAL_FIGURE]:.1f} on val)")
    return {"score_weight": best, "figure": VAL_FIGURE, "val": {str(w): f for w, f in figures.items()}}


def write_bundle(encoder: Path, reranker: Path, score_weight: float, out: Path) -> None:
    """Encoder weights stored as fp16 (loading casts them back to fp32), the reranker as trained with the
    score weight chosen on val."""
    out.mkdir(parents=True, exist_ok=True)
    half = {k: v.half() if v.is_floating_point() else v for k, v in load_file(str(encoder)).items()}
    save_file(half, str(out / "encoder.safetensors"))
    shutil.copyfile(encoder.with_suffix(".json"), out / "encoder.json")
    shutil.copyfile(reranker, out / "reranker.safetensors")
    meta = json.loads(reranker.with_suffix(".json").read_text())
    meta["fusion_config"]["score_weight"] = score_weight
    (out / "reranker.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    bundle = {"arch": "itm-demo", "encoder": "encoder.safetensors", "reranker": "reranker.safetensors",
              "trained_by": "training/recipes/demo.py"}
    (out / "bundle.json").write_text(json.dumps(bundle, indent=2) + "\n")


def plot_curves(work: Path, out: Path) -> None:
    """Loss and validation curves of each stage whose log.jsonl is in `work`."""
    try:
        import matplotlib
    except ImportError:
        print("curves: matplotlib is not installed (pip install -e '.[plot]'); the figures are in log.jsonl")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    logs = {stage: work / stage / "log.jsonl" for stage in ("encoders", "reranker", "hard", "robust")}
    for stage, log in list(logs.items()):
        if not log.is_file():  # e.g. a reranker retrained on encoders from an earlier run
            print(f"curves: no {log}; the plot leaves the {stage} stage out")
            del logs[stage]
    if not logs:
        return
    fig, axes = plt.subplots(2, len(logs), figsize=(5.5 * len(logs), 7), squeeze=False)
    for col, (stage, log) in enumerate(logs.items()):
        records = [json.loads(line) for line in log.read_text().splitlines()]
        losses = [r for r in records if "loss" in r]
        vals = [r for r in records if "val" in r]
        ax = axes[0, col]
        for part in losses[0]["loss"] if losses else []:
            ax.plot([r["step"] for r in losses], [r["loss"][part] for r in losses], label=part)
        ax.set(title=f"{stage}: training losses", xlabel="step")
        ax.legend()
        ax = axes[1, col]
        for key in ("t2i_r1", "i2t_r1", "swap", "clean", "degraded"):
            if vals and key in vals[0]["val"]:
                ax.plot([r["step"] for r in vals], [r["val"][key] for r in vals], marker="o", label=key)
        what = "feature error against the original" if stage == "robust" else "%"
        ax.set(title=f"{stage}: validation ({what})", xlabel="step")
        ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    print(f"curves: wrote {out}")


if __name__ == "__main__":
    torch.set_num_threads(torch.get_num_threads())
    main()
