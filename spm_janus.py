"""
Erase a visual concept from Janus-Pro's image generation with SPM membranes (Lyu et al., CVPR 2024).

A membrane is a rank-1 adapter around a frozen Linear of the Llama decoder, y = W x + m * (alpha / rank) * up(down(x)),
up zero-initialised. The teacher is the same model with its membranes off. At every image step the student's logits
for the concept prompt are trained towards t = l(surrogate) - eta * (l(concept) - l(surrogate)) (teacher logits), and
all 576 steps of a rollout come from ONE teacher-forced pass, since step i only depends on the codes before it.

    python spm_janus.py --concept mouse --layers attn --loss kl         # or: train(Config(concept="mouse"))

Self-contained (copy it into your project), no work at import time. Sections: the settings (Config), the membrane,
models, prompts and the one pass, targets, words, soft prompts, the trainer and its levers, files, the command line.
"""
import argparse
import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
LAYER_CHOICES = {"attn": ATTN_MODULES, "mlp": MLP_MODULES, "attn+mlp": ATTN_MODULES + MLP_MODULES}
SCOPES = ("prompt", "image", "prompt+image", "all")  # where membranes act: see Config.scope
DEFAULT_TEMPLATES = ("{}", "a {}", "a photo of a {}", "a picture of a {}", "an image of a {}")
# Concepts kept intact by prompt anchoring when --anchor-prompts is not given; the erased ones are dropped from it.
COMMON_CONCEPTS = ("person", "cat", "dog", "bird", "fish", "horse", "mouse", "car", "tree", "house",
                   "flower", "boat", "chair", "apple", "mountain", "city")


class Preset(NamedTuple):
    """What a --concept-type trains on by default: templates (and held-out ones, for evaluation on a real model),
    anchors (other concepts of the same type), the surrogate and the anchor weight. Templates and anchors a tokenizer
    cannot spell are dropped, so the toy world's words stand beside real ones."""
    templates: tuple
    held_out: tuple
    anchors: tuple
    surrogate: str
    anchor_weight: float = 3.0


SUBJECTS = ("cat", "dog", "house", "tree", "car", "bird")  # what a style or an attribute is trained on
PRESETS = {
    "object": Preset(DEFAULT_TEMPLATES, ("a drawing of a {}", "a close-up photo of a {}", "a {} in a field",
                                         "a painting of a {}", "a cartoon {}"), COMMON_CONCEPTS, ""),
    # artists and art styles (ESD's and MACE's protocols), and drawing styles such as the toy world's
    "style": Preset(("a painting in the style of {}", "an artwork by {}", "a picture in {} style")
                    + tuple(f"a {{}} {s}" for s in SUBJECTS),
                    ("a famous painting by {}", "a portrait in the style of {}", "a landscape by {}",
                     "a photo of a {} mouse", "a drawing of a {} fish", "an image of a {} mouse"),
                    ("Van Gogh", "Picasso", "Monet", "Rembrandt", "Salvador Dali", "Andy Warhol", "Hokusai",
                     "watercolor", "pixel art", "cartoon", "pastel", "solid", "shaded", "striped"), "-",
                    # a style's erasure spread to the other styles at 3 (84% of them kept on the toy), not at 10 (96%)
                    10.0),
    # a colour or another property of the subject, which stays
    "attribute": Preset(tuple(f"a {{}} {s}" for s in SUBJECTS), ("a photo of a {} mouse", "a drawing of a {} fish",
                                                                "a {} flower in a vase", "a picture of a {} boat"),
                        ("red", "green", "blue", "yellow", "black", "white", "orange", "purple", "wooden"), "-"),
    # unsafe content (I2P-style prompts); judged with --judge nudenet
    "nudity": Preset(("a photo of a {} person", "a {} woman", "a {} man", "a painting of a {} body",
                      "{} people on a beach"), ("a {} couple in bed", "an oil painting of a {} figure",
                                                "a {} model posing", "a {} swimmer"),
                     ("clothed", "dressed", "smiling", "young", "old"), "-"),
}
# Generic context words for --augment, written without any evaluation prompt in view and filtered to what a
# tokenizer can spell: erasure trained on random context around the concept is not keyed to the exact template.
AUGMENT_WORDS = ("a", "an", "the", "of", "and", "with", "in", "on", "one", "two", "very", "photo", "picture", "image",
                 "drawing", "painting", "sketch", "art", "style", "portrait", "close-up", "red", "green", "blue",
                 "yellow", "black", "white", "small", "big", "real", "cute", "old", "new", "little", "happy")
PUNCTUATION = (",", ".", "!", "?", ":")
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<begin_of_image>", "<end_of_image>", "<image_placeholder>", "<unk>",
                  "<|User|>", "<|Assistant|>")
CHECKPOINT_NAME, STATE_NAME = "membranes.safetensors", "trainer_state.pt"


class SPMError(Exception):
    """A problem the user can fix, printed as one line; exit_code 2 = the user's input, 1 = the environment."""

    def __init__(self, message, exit_code=1):
        super().__init__(message)
        self.exit_code = exit_code


# -----------------------------------------------------------------------------
# Settings: one dataclass, validated once, saved with the membranes; the command line is made from it


def setting(default, help, group, type=None, choices=None, least=None, many=False, resumable=False):
    """A Config field and its flag. least: the smallest count; many: a repeatable flag; resumable: --resume may
    change it (the budget and the plumbing; everything else defines the run)."""
    return dataclasses.field(default=default, metadata=dict(
        help=help, group=group, type=type, choices=choices, least=least, many=many, resumable=resumable))


def rank_value(text):
    """--rank: a whole number, or full."""
    if text == "full":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is no rank: give a whole number or full") from None


@dataclasses.dataclass
class Config:
    """Every setting of a run. None = from the model: resolved(model, tokenizer) fills in the templates, CFG,
    temperature, anchors and sample prompts, and the Trainer takes only a resolved Config."""
    model: str = setting("deepseek-community/Janus-Pro-1B", "hub id or local directory in transformers' Janus "
                         "format; tiny = a random model built here; toy = the toy model next to this file", "model")
    dtype: str = setting("float32", "base weight dtype (membranes stay float32)", "model",
                         choices=("float32", "bfloat16", "float16"))
    device: str = setting("auto", "auto (cuda, then mps, then cpu), cuda, mps or cpu", "model", resumable=True)
    threads: int = setting(0, "torch CPU threads; 0 = 1 thread for models narrower than 512, else torch's default",
                           "model", least=0, resumable=True)
    layers: str = setting("attn", "attn = q,k,v,o projections; mlp = gate,up,down; attn+mlp = both", "membranes",
                          choices=tuple(LAYER_CHOICES))
    modules: list = setting(None, "comma-separated subset of the --layers module names, e.g. q_proj,v_proj "
                            "(default: all of --layers)", "membranes", type=str)
    attn_layer_ids: str = setting(None, "decoder layers whose attention gets membranes, e.g. 0-5,9 (default: all)",
                                  "membranes", type=str)
    mlp_layer_ids: str = setting(None, "decoder layers whose MLP gets membranes (default: all)", "membranes", type=str)
    scope: str = setting("prompt", "where the membranes act in a prompt that draws an image: its text positions "
                         "(erased best on the toy), its image positions (from <begin_of_image>), both (prompt+image), "
                         "or all positions of every pass; under every scope but all, understanding and text stay "
                         "the base model's", "membranes", choices=SCOPES)
    rank: int = setting(1, "membrane rank (SPM: 1); full = the full rank of every wrapped Linear, a full-rank delta "
                        "(what ESD and EAR fine-tune)", "membranes", type=rank_value)
    alpha: float = setting(1.0, "the delta is scaled by alpha / rank", "membranes")
    on_top: list = setting(None, "run directory whose membranes this run trains on top of, loaded frozen and on "
                           "throughout, so that the teacher is the model with them: the anchors hold what both sets "
                           "draw together (load them so: sample.py --ckpt DIR --ckpt OUT); repeatable", "membranes",
                           type=str, many=True)
    concept: list = setting(None, "concept to erase; repeat for several (required)", "prompts", type=str, many=True)
    concept_type: str = setting("object", "what the concept is: an object ('a photo of a {}'), a style ('a {} cat', "
                                "artists), an attribute such as a colour ('a {} car'), or nudity; it chooses the default "
                                "templates, anchors and surrogate, and what sample.py --eval asks", "prompts",
                                choices=tuple(PRESETS))
    templates: list = setting(None, "prompt template containing {}, or a file with one per line; repeatable "
                              "(default: the --concept-type's, those the tokenizer spells; for object "
                              f"{', '.join(repr(t) for t in DEFAULT_TEMPLATES)})", "prompts", type=str, many=True)
    surrogate: str = setting(None, "what the concept is mapped to: '' = the model's own unconditional (all-pad) "
                             "prompt; '-' = the same prompt without the concept's word (the subject of a style or an "
                             "attribute stays); or a substitute such as 'real mouse' (default: '' for object, '-' for "
                             "the other types)", "prompts", type=str)
    eta: float = setting(1.0, "negative-guidance strength: t = sur - eta * (con - sur)", "prompts")
    cfg: float = setting(None, "CFG scale of rollouts (default: the model's, 5 for Janus-Pro)", "prompts", type=float)
    temperature: float = setting(None, "sampling temperature of rollouts (default: the model's, 1 for Janus-Pro)",
                                 "prompts", type=float)
    loss: str = setting("kl", "divergence on the logits of every image step, or hidden: MSE on the last hidden states "
                        "of the image steps (as EAR)", "loss", choices=("kl", "mse", "hidden"))
    kl_direction: str = setting("forward", "forward = KL(target || student), reverse = KL(student || target)",
                                "loss", choices=("forward", "reverse"))
    loss_on: str = setting("cond", "raw conditional logits, or the CFG-combined distribution that is sampled", "loss",
                           choices=("cond", "cfg"))
    rollout: str = setting(None, "who samples the concept's image tokens: student (membranes on, on-policy), "
                           "teacher, the target itself (teacher at CFG -cfg*eta; needs the empty surrogate), or "
                           "surrogate (the student on the surrogate prompt: pictures as the erasure should draw them) "
                           "(default: student for object, surrogate for the other types)", "loss", type=str,
                           choices=("student", "teacher", "target", "surrogate"))
    augment: float = setting(1.0, "share of training prompts whose template gets 1-3 random edits (generic words "
                             "inserted, deletions, swaps, shuffles, punctuation)", "robustness")
    adversarial: str = setting("soft", "soft = a soft prompt attacks the membranes every --adversarial-every steps "
                               "(warm start) and is trained towards the concept's target as well", "robustness",
                               choices=("none", "soft"))
    adversarial_every: int = setting(10, "steps between attacks of --adversarial", "robustness", least=1)
    adversarial_steps: int = setting(20, "Adam steps of each attack", "robustness", least=0)
    adversarial_tokens: int = setting(4, "soft prompt length of --adversarial soft", "robustness", least=1)
    adversary_pool: int = setting(1, "soft prompts kept per concept (a replay buffer from distinct random starts): "
                                  "each attack re-optimises the next one in turn, warm, and every step trains against "
                                  "all of them (1 = one warm-started prompt)", "robustness", least=1)
    adversary_codes: str = setting("rollout", "image tokens the adversaries' rows (--adversarial, --latent-eps) are "
                                   "teacher-forced on: rollout = the concept rows' own; concept = per row one of the "
                                   "teacher's concept pictures the adversary is optimised to draw, with the teacher's "
                                   "target there (trained where the attack succeeds)", "robustness",
                                   choices=("rollout", "concept"))
    latent_eps: float = setting(0.0, "latent adversarial training: each step a perturbation of the residual stream at "
                                "the concept prompt's positions (or --latent-positions), each at most this share of "
                                "that position's norm, is found by PGD to bring the concept back and is trained away "
                                "(0 = off)", "robustness",
                                least=0)
    latent_layer: int = setting(None, "decoder layer whose input --latent-eps perturbs (default: the middle one)",
                                "robustness", type=int, least=0)
    latent_steps: int = setting(4, "PGD steps of each --latent-eps attack", "robustness", least=1)
    latent_positions: str = setting("prompt", "where --latent-eps perturbs the residual stream: the concept prompt's "
                                    "positions (where a soft prompt acts), the image positions (where the concept "
                                    "is drawn) of the teacher's concept pictures, trained there as --adversary-codes "
                                    "concept does, or both (prompt+image)",
                                    "robustness", choices=("prompt", "image", "prompt+image"))
    anchor: str = setting(None, "keep other concepts: none; latent = SPM's norm-matched random concept embeddings; "
                          "prompts = --anchor-prompts (default: prompts, a built-in list of common concepts minus the "
                          "erased ones)", "anchoring", type=str, choices=("none", "latent", "prompts"))
    anchor_prompts: list = setting(None, "concept to keep with --anchor prompts; repeatable", "anchoring", type=str,
                                   many=True)
    anchor_weight: float = setting(None, "weight of the anchor KL(teacher || student) (default: 3; 10 for a style)",
                                   "anchoring", type=float)
    anchor_vocabulary: int = setting(0, "also hold to the teacher, batch-size rows a step, prompts of N of the "
                                     "tokenizer's own words (a seeded draw): anchors nobody listed. A word whose "
                                     "prompt draws the concept (by the teacher's likelihood of its pictures) is left "
                                     "out, so its synonyms stay erased (0 = off)", "anchoring", least=0)
    adversarial_anchors: int = setting(0, "adversarial anchors: soft prompts kept that draw the --anchor-prompts "
                                       "through the membranes, each attack (every --adversarial-every steps, "
                                       "--adversarial-steps Adam steps) replacing the oldest with one for the next "
                                       "anchor in turn; each step the student on every kept prompt, teacher-forced on "
                                       "its anchor's pictures, is held to the teacher there (0 = off)", "anchoring",
                                       least=0)
    adversarial_anchors_from: str = setting("anchors", "what --adversarial-anchors' soft prompts draw: the "
                                            "--anchor-prompts in turn, or (vocabulary) a seeded pick per attack "
                                            "of --anchor-vocabulary's words, so that anchors nobody listed are "
                                            "attacked and held too", "anchoring", choices=("anchors", "vocabulary"))
    avoid: list = setting(None, "a concept the erased prompts must not turn into, e.g. one another membrane erases; "
                          "repeatable: per step and row the student's likelihood of one of the teacher's pictures of "
                          "it, given the concept prompt, is held at most at the erasure target's", "anchoring",
                          type=str, many=True)
    steps: int = setting(400, "optimisation steps", "optimisation", least=1, resumable=True)
    batch_size: int = setting(4, "concept rollouts per step (per process)", "optimisation", least=1)
    lr: float = setting(1e-3, "AdamW peak learning rate", "optimisation")
    weight_decay: float = setting(0.0, "AdamW weight decay", "optimisation")
    warmup: int = setting(10, "linear warm-up steps before the cosine decay to 10%", "optimisation", least=0)
    grad_clip: float = setting(1.0, "max gradient norm (0 = off)", "optimisation")
    seed: int = setting(0, "seed of prompts, rollouts, anchors and membrane init", "optimisation")
    rollout_every: int = setting(1, "new prompts and rollout every K steps (exact resume needs K = 1)",
                                 "optimisation", least=1)
    ema: float = setting(0.0, "publish an exponential moving average of the membranes with this decay per step "
                         "(bias-corrected; the trainer state keeps the raw ones for --resume) (0 = off)",
                         "optimisation", least=0)
    select_every: int = setting(0, "every K steps score the membranes on held-out prompts (new draws of the training "
                                "prompts, teacher-forced on the teacher's pictures: the erasure term plus the anchor "
                                "terms) and publish the lowest-scoring ones, judge-free early stopping (0 = off)",
                                "optimisation", least=0)
    max_bad_steps: int = setting(10, "stop after this many non-finite steps in a row (each is skipped)",
                                 "optimisation", least=1, resumable=True)
    out: str = setting(None, "run directory (default: runs/<concept>)", "output", type=str)
    save_every: int = setting(50, "save a checkpoint every K steps (0 = only at the end)", "output", least=0,
                              resumable=True)
    sample_every: int = setting(50, "write a PNG grid at step 0, every K steps and at the end (0 = never)", "output",
                                least=0, resumable=True)
    sample_prompts: list = setting(None, "unrelated test prompt for the grids; repeatable (default: three anchor "
                                   "concepts)", "output", type=str, many=True, resumable=True)

    def __post_init__(self):
        """Normalise and validate what needs no model, with one-line errors that name the flag."""
        def listed(value):
            return [value] if isinstance(value, str) else list(value) if value is not None else None

        self.concept = [c.strip() for c in listed(self.concept) or []]
        if not self.concept or not all(self.concept):
            raise SPMError("--concept is empty: name the concept to erase, e.g. --concept mouse", 2)
        if isinstance(self.modules, str):
            self.modules = [m.strip() for m in self.modules.split(",") if m.strip()]
        self.modules, self.templates = listed(self.modules) or None, listed(self.templates)
        self.sample_prompts = listed(self.sample_prompts)
        self.anchor_prompts = [c.strip() for c in listed(self.anchor_prompts) or [] if c.strip()] or None
        self.avoid = [c.strip() for c in listed(self.avoid) or [] if c.strip()]
        self.on_top = listed(self.on_top) or []
        if set(self.avoid) & set(self.concept):
            raise SPMError(f"--avoid {sorted(set(self.avoid) & set(self.concept))[0]!r} is a concept this run "
                           f"erases: name another one, e.g. the concept of another membrane", 2)
        for f in dataclasses.fields(self):
            value, meta, flag = getattr(self, f.name), f.metadata, "--" + f.name.replace("_", "-")
            if meta["choices"] and value is not None and value not in meta["choices"]:
                raise SPMError(f"{flag} {value!r}: choose from {', '.join(meta['choices'])}", 2)
            if meta["least"] is not None and value is not None and value < meta["least"]:
                raise SPMError(f"{flag} {value} must be at least {meta['least']}", 2)
        if not 0 <= self.augment <= 1:
            raise SPMError(f"--augment {self.augment} is a share of the prompts: give a number from 0 to 1", 2)
        if self.ema >= 1:
            raise SPMError(f"--ema {self.ema:g} is a decay per step: give a number from 0 to below 1, e.g. 0.99", 2)
        if self.ema and self.select_every:
            raise SPMError("--ema and --select-every each choose the membranes a checkpoint publishes: use one", 2)
        if self.latent_positions != "prompt" and not self.latent_eps:
            raise SPMError(f"--latent-positions {self.latent_positions} says where --latent-eps attacks: add "
                           f"--latent-eps, e.g. --latent-eps 0.5", 2)
        if self.lr <= 0:
            raise SPMError(f"--lr {self.lr:g} must be positive", 2)
        if self.surrogate is not None and self.surrogate.strip() in self.concept:
            raise SPMError(f"--surrogate {self.surrogate!r} equals the concept: use '' or a substitute such as "
                           f"'real {self.concept[0]}'", 2)
        if self.rollout == "target" and (self.surrogate or self.surrogate is None and self.concept_type != "object"):
            raise SPMError("--rollout target samples from the empty-surrogate target: drop --surrogate, or use "
                           "--rollout student", 2)
        if self.adversarial_anchors_from == "vocabulary" and not (self.adversarial_anchors and self.anchor_vocabulary):
            raise SPMError("--adversarial-anchors-from vocabulary draws --anchor-vocabulary's words with "
                           "--adversarial-anchors' soft prompts: add both, e.g. --adversarial-anchors 3 "
                           "--anchor-vocabulary 256", 2)
        if self.adversarial_anchors and self.adversarial_anchors_from == "anchors" and \
                self.anchor in ("none", "latent"):
            raise SPMError(f"--adversarial-anchors draws the anchors' pictures, which --anchor {self.anchor} does not "
                           f"name: use --anchor prompts (or leave --anchor unset for the built-in list)", 2)
        if self.anchor == "prompts" and not self.anchor_prompts:
            raise SPMError("--anchor prompts needs --anchor-prompts: name concepts to keep, e.g. --anchor-prompts cat "
                           "--anchor-prompts car (or leave --anchor unset for the built-in list)", 2)
        if self.rank != "full" and (not isinstance(self.rank, int) or self.rank < 1):
            raise SPMError(f"--rank {self.rank} must be at least 1, or full", 2)
        if self.loss == "hidden" and self.loss_on == "cfg":
            raise SPMError("--loss hidden compares hidden states, which CFG does not combine: use --loss-on cond", 2)
        check_modules(self.layers, self.modules)
        bad = [t for t in self.templates or [] if t.count("{}") != 1 or t.count("{") != 1 or t.count("}") != 1]
        if bad:
            raise SPMError(f"--templates {bad[0]!r} needs exactly one {{}} for the concept: write it like "
                           f"'a photo of a {{}}'", 2)
        self.out = self.out or os.path.join("runs", "_".join(c.replace(" ", "-") for c in self.concept))

    @property
    def is_resolved(self):
        return None not in (self.templates, self.cfg, self.temperature, self.anchor, self.surrogate, self.rollout,
                            self.anchor_weight)

    def resolved(self, model, tokenizer):
        """A copy with every None filled in from the model and its tokenizer, and checked against them."""
        preset = PRESETS[self.concept_type]
        surrogate = preset.surrogate if self.surrogate is None else self.surrogate
        unknown = [c for c in self.concept + [surrogate] + self.avoid
                   if c not in ("", "-") and not known_concepts(tokenizer, [c])]
        if unknown:
            raise SPMError(f"{unknown[0]!r} has words this model's tokenizer cannot spell: choose another word", 2)
        templates = self.templates or [t for t in preset.templates if known_concepts(tokenizer, [t.format("")])]
        if not templates:
            raise SPMError(f"this tokenizer spells none of the {self.concept_type} templates: give --templates", 2)
        cfg, temperature = generation_defaults(model)
        anchor, anchor_prompts = self.anchor, self.anchor_prompts
        if anchor is None:
            anchor, anchor_prompts = "prompts", anchor_prompts or \
                [c for c in known_concepts(tokenizer, preset.anchors) if c not in self.concept]
        if anchor == "prompts" and not anchor_prompts:
            raise SPMError(f"this tokenizer spells none of the {self.concept_type} anchors: name concepts to keep "
                           f"with --anchor-prompts, or use --anchor latent or none", 2)
        kept = anchor_prompts or known_concepts(tokenizer, preset.anchors)
        resolved = dataclasses.replace(
            self, templates=templates, anchor=anchor, anchor_prompts=anchor_prompts, surrogate=surrogate,
            anchor_weight=preset.anchor_weight if self.anchor_weight is None else self.anchor_weight,
            rollout=self.rollout or ("student" if self.concept_type == "object" else "surrogate"),
            cfg=cfg if self.cfg is None else self.cfg,
            temperature=temperature if self.temperature is None else self.temperature,
            sample_prompts=self.sample_prompts or [example(self.concept_type, templates, c) for c in self.concept] +
            [example(self.concept_type, templates, c) for c in kept[:3] if c not in self.concept])
        layers = model.config.text_config.num_hidden_layers
        if self.latent_layer is not None and self.latent_layer >= layers:
            raise SPMError(f"--latent-layer {self.latent_layer}: this model's decoder has layers 0-{layers - 1}", 2)
        context = model.config.text_config.max_position_embeddings - model.config.vision_config.num_image_tokens
        for word in resolved.concept + [surrogate.strip("-")] + (resolved.anchor_prompts or []):
            for template in resolved.templates:  # one-line error for a prompt over the context
                encode_prompts(tokenizer, [template.format(word)], max_length=context)
        return resolved

    def example(self, concept):
        """A prompt that shows `concept`, for the sample grids and the training log."""
        return example(self.concept_type, self.templates, concept)

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values):
        """A checkpoint's Config: keys of other versions are ignored, missing ones take the defaults."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


def example(concept_type, templates, concept):
    """'a mouse' for an object; for another type the first template (it needs its subject: 'a striped cat')."""
    return f"a {concept}" if concept_type == "object" else templates[0].format(concept)


# -----------------------------------------------------------------------------
# The membrane and its gate


class MembraneState:
    """Shared by the membranes of one attachment: on/off, strength, the token-position gate, merged or not."""

    def __init__(self):
        self.enabled, self.merged = True, False
        self.multiplier = 1.0  # a float, or a tensor [B, 1, 1]: one strength per row
        self.gate = None  # None = every position; False = none; else float [B, L, 1], set by the pre-hook


class MembraneLinear(nn.Module):
    """y = base(x) + multiplier * (alpha / rank) * up(down(x)); keeps the base Linear as it is."""

    def __init__(self, base: nn.Linear, rank, alpha: float, state: MembraneState, generator=None):
        super().__init__()
        self.base = base
        rank = min(base.in_features, base.out_features) if rank == "full" else rank
        # like an nn.Linear from outside, so that membranes of another run can wrap this one: their deltas add
        self.in_features, self.out_features = base.in_features, base.out_features
        self.down = nn.Linear(base.in_features, rank, bias=False, device=base.weight.device, dtype=torch.float32)
        self.up = nn.Linear(rank, base.out_features, bias=False, device=base.weight.device, dtype=torch.float32)
        with torch.no_grad():  # nn.Linear's default bound, drawn from a seeded generator so runs repeat exactly
            bound = 1 / math.sqrt(base.in_features)
            self.down.weight.copy_(torch.rand(self.down.weight.shape, generator=generator) * 2 * bound - bound)
        nn.init.zeros_(self.up.weight)  # a fresh membrane is an exact no-op
        self.scale = alpha / rank
        self.state = state  # a plain attribute, not a submodule: all membranes of the attachment share it

    def forward(self, x):
        state = self.state
        if not state.enabled or state.merged or state.gate is False:
            return self.base(x)
        gate, down, up = state.gate, self.down.weight, self.up.weight
        scale = state.multiplier * self.scale
        if torch.is_grad_enabled() or torch.is_tensor(scale):
            # the gate and the strength scale the rank-r activation, the smallest tensor on the way
            out = self.base(x)
            h = F.linear(x.to(down.dtype), down)
            h = h * (scale if gate is None else gate * scale)
            delta = F.linear(h, up).to(out.dtype)
            return out + delta if torch.is_grad_enabled() else out.add_(delta)
        # Sampling, one token a step: the cost is the number of torch calls, not FLOPs. Three in all: the base matmul
        # (without the inner module's __call__), h = x @ down.T, and out += scale * h @ up.T in place.
        base = self.base
        plain = type(base) is nn.Linear and not base._forward_hooks and not base._forward_pre_hooks
        out = F.linear(x, base.weight, base.bias) if plain else base(x)
        h = torch.mm(x.reshape(-1, x.shape[-1]).to(down.dtype), down.t())  # [B*L, rank]
        if gate is not None:
            h = h * gate.reshape(-1, 1)
        if out.dtype == up.dtype and out.is_contiguous():
            out.view(-1, out.shape[-1]).addmm_(h, up.t(), alpha=scale)
        else:  # a low-precision base: the delta is made in float32, then cast
            out.add_((torch.mm(h, up.t()) * scale).to(out.dtype).view(out.shape))
        return out

    @property
    def weight(self):
        return self.base.weight

    def merged_delta(self):
        """multiplier * scale * up @ down, the [out, in] update that merging adds to W."""
        if torch.is_tensor(self.state.multiplier):
            raise SPMError("merge() needs one strength for every row, not a per-prompt tensor", 2)
        return (self.up.weight @ self.down.weight) * (self.state.multiplier * self.scale)


class Membranes:
    """The membranes attached to one model: on/off, strength, save, merge, detach. Disabled, the model is exactly
    the base model: that is the teacher."""

    def __init__(self, model, names, rank=1, alpha=1.0, scope="image", image_token_ids=None, seed=0):
        if scope not in SCOPES:
            raise SPMError(f"unknown scope {scope!r}: use {', '.join(SCOPES)}", 2)
        if scope != "all" and image_token_ids is None:
            raise SPMError(f"scope {scope} needs the ids of <begin_of_image> and <end_of_image>", 2)
        self.model, self.names, self.rank, self.alpha, self.scope = model, list(names), rank, alpha, scope
        self.image_token_ids, self.state, self.modules = image_token_ids, MembraneState(), {}
        for name in self.names:
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            generator = torch.Generator().manual_seed(derived_seed(seed, name))
            self.modules[name] = MembraneLinear(getattr(parent, attr), rank, alpha, self.state, generator)
            setattr(parent, attr, self.modules[name])
        self._drawing = None  # per row of the running KV-cached pass: does it draw an image? and (all, any) of it
        self._hook = None if scope == "all" else \
            model.model.language_model.register_forward_pre_hook(self._set_gate, with_kwargs=True)

    def _set_gate(self, module, args, kwargs):
        """A row draws an image when its last <begin_of_image> is not closed by an <end_of_image> (an image given
        to understand sits between the two). Its image positions start AT <begin_of_image>, whose output predicts
        the first image token; rows that draw nothing (text, understanding) get no membrane under any gated scope."""
        embeds = kwargs.get("inputs_embeds")
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        batch, length = (embeds.shape[:2] if embeds is not None else input_ids.shape)
        if cache is not None and cache.get_seq_length() > 0 and self._drawing is not None \
                and self._drawing[0].shape[0] == batch:  # a KV-cached step continues its rows: an image step, or text
            drawing, every, any_ = self._drawing
            if self.scope == "prompt" or not any_:
                self.state.gate = False
            else:
                self.state.gate = None if every else drawing[:, None, None].expand(batch, length, 1).float()
            return
        marks = []
        for token_id in self.image_token_ids:
            if embeds is not None:
                vector = module.get_input_embeddings().weight[token_id].to(embeds.dtype)
                marks.append((embeds == vector).all(-1))
            else:
                marks.append(input_ids == token_id)
        index = torch.arange(1, length + 1, device=marks[0].device)
        last_begin, last_end = ((mark * index).amax(1) for mark in marks)  # 0 = none in the row
        drawing = last_begin > last_end
        image = drawing[:, None] & (index[None] >= last_begin[:, None])
        self._drawing = (drawing, bool(drawing.all()), bool(drawing.any()))  # host syncs once per prompt, not step
        if self.scope == "image":
            gate = image
        elif self.scope == "prompt":
            gate = drawing[:, None] & ~image
        else:  # prompt+image: every position of a row that draws
            gate = drawing[:, None].expand(batch, length)
        self.state.gate = gate[..., None].to(torch.float32)

    def merge(self):
        """W += delta for every membrane: sampling at no extra cost. Scope all only: a gated delta is no weight."""
        if self.scope != "all":
            raise SPMError(f"cannot merge membranes of scope {self.scope}: only scope all acts on every position "
                           f"the way a weight does", 2)
        if not self.state.merged:
            self._fold(+1)
            self.state.merged = True

    def unmerge(self):
        """W -= delta: the base weights as they were, to float rounding."""
        if self.state.merged:
            self._fold(-1)
            self.state.merged = False

    @torch.no_grad()
    def _fold(self, sign):
        for m in self.modules.values():
            m.base.weight.copy_((m.base.weight.float() + sign * m.merged_delta()).to(m.base.weight.dtype))

    @contextlib.contextmanager
    def switched(self, enabled: bool):
        if self.state.merged and not enabled:
            raise SPMError("the membranes are merged into the weights: unmerge() before switching them off", 2)
        previous, self.state.enabled = self.state.enabled, enabled
        try:
            yield self
        finally:
            self.state.enabled = previous

    def disabled(self):
        return self.switched(False)

    def enabled(self):
        return self.switched(True)

    @contextlib.contextmanager
    def strength(self, multiplier):
        previous, self.state.multiplier = self.state.multiplier, multiplier
        try:
            yield self
        finally:
            self.state.multiplier = previous

    def parameters(self):
        return [p for m in self.modules.values() for p in (m.down.weight, m.up.weight)]

    def num_parameters(self):
        return sum(p.numel() for p in self.parameters())

    def state_dict(self):
        """A copy of the factors: the tensors do not follow later steps (on the CPU .float() alone would be a view)."""
        return {f"{name}.{part}": getattr(m, part).weight.detach().float().cpu().clone().contiguous()
                for name, m in self.modules.items() for part in ("down", "up")}

    def load_state_dict(self, tensors, source="checkpoint"):
        expected = {k: v.shape for k, v in self.state_dict().items()}
        missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        if missing or unexpected:
            raise SPMError(f"{source}: tensor names do not match the model's membranes "
                           f"(missing {missing[:2]}, unexpected {unexpected[:2]})", 2)
        for key, shape in expected.items():
            if tuple(tensors[key].shape) != tuple(shape):
                raise SPMError(f"{source}: tensor {key} has shape {tuple(tensors[key].shape)}, the model needs "
                               f"{tuple(shape)}: the checkpoint was made for another model", 2)
        with torch.no_grad():
            for name, m in self.modules.items():
                m.down.weight.copy_(tensors[f"{name}.down"])
                m.up.weight.copy_(tensors[f"{name}.up"])

    def detach(self):
        """Remove the membranes: the model's module tree is exactly what it was before attaching."""
        self.unmerge()
        for name, wrapper in self.modules.items():
            parent_name, _, attr = name.rpartition(".")
            holder, key = self.model.get_submodule(parent_name), attr
            current = getattr(holder, key)
            while current is not wrapper:  # another attachment may have wrapped ours since
                holder, key, current = current, "base", current.base
            setattr(holder, key, wrapper.base)
        if self._hook is not None:
            self._hook.remove()
        self.modules, self.state.gate = {}, None


def parse_layer_ids(spec, num_layers, flag="--attn-layer-ids"):
    """'0-5,9' -> [0, 1, 2, 3, 4, 5, 9]; None or 'all' -> every layer."""
    if spec is None or str(spec).strip().lower() == "all":
        return list(range(num_layers))
    ids = set()
    try:
        for part in str(spec).split(","):
            lo, _, hi = part.strip().partition("-")
            ids.update(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise SPMError(f"{flag} {spec!r} is not a list of layer ids: write it like 0-5,9", 2) from None
    bad = sorted(i for i in ids if not 0 <= i < num_layers)
    if bad or not ids:
        raise SPMError(f"{flag} {spec!r}: layer id {bad[0] if bad else spec} is out of range, "
                       f"the model has layers 0-{num_layers - 1}", 2)
    return sorted(ids)


def check_modules(layers, modules=None):
    """The --modules of --layers (all of them when none are named); a name outside --layers is an error."""
    unknown = [m for m in modules or [] if m not in LAYER_CHOICES[layers]]
    if unknown:
        raise SPMError(f"--modules {unknown[0]!r} is not a module of --layers {layers}: "
                       f"choose from {','.join(LAYER_CHOICES[layers])}", 2)
    return list(modules or LAYER_CHOICES[layers])


def membrane_targets(num_layers, layers="attn", modules=None, attn_layer_ids=None, mlp_layer_ids=None):
    """Names of the Linear modules to wrap, e.g. 'model.language_model.layers.0.self_attn.q_proj'."""
    modules = check_modules(layers, modules)
    attn_ids = parse_layer_ids(attn_layer_ids, num_layers, "--attn-layer-ids")
    mlp_ids = parse_layer_ids(mlp_layer_ids, num_layers, "--mlp-layer-ids")
    names = []
    for i in range(num_layers):
        for m in modules:
            if m in ATTN_MODULES and i in attn_ids:
                names.append(f"model.language_model.layers.{i}.self_attn.{m}")
            if m in MLP_MODULES and i in mlp_ids:
                names.append(f"model.language_model.layers.{i}.mlp.{m}")
    return names


def attach_membranes(model, tokenizer, layers="attn", modules=None, attn_layer_ids=None, mlp_layer_ids=None,
                     rank=1, alpha=1.0, scope="image", seed=0):
    """Wrap the chosen Linears of the Llama decoder in membranes and return the handle."""
    if rank != "full" and rank < 1:
        raise SPMError(f"--rank {rank} must be at least 1", 2)
    names = membrane_targets(model.config.text_config.num_hidden_layers, layers, modules,
                             attn_layer_ids, mlp_layer_ids)
    return Membranes(model, names, rank, alpha, scope, image_token_ids(tokenizer), seed)


def attach_for(model, tokenizer, config):
    """The membranes a Config asks for."""
    return attach_membranes(model, tokenizer, config.layers, config.modules, config.attn_layer_ids,
                            config.mlp_layer_ids, config.rank, config.alpha, config.scope, config.seed)


# -----------------------------------------------------------------------------
# Models: a hub id or a local directory in transformers' Janus format, 'tiny' built here, 'toy' next to this file


def word_tokenizer(words):
    """An offline word-level tokenizer with Janus' special tokens; works with JanusProcessor and save_pretrained."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {}
    for token in list(SPECIAL_TOKENS) + [":", ".", ","] + list(words):
        vocab.setdefault(token, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        padding_side="left", extra_special_tokens={"image_token": "<image_placeholder>",
                                                   "boi_token": "<begin_of_image>", "eoi_token": "<end_of_image>"})


def janus_config(vocab_size, hidden=64, intermediate=128, layers=2, heads=4, grid=8, patch=4, codebook=256,
                 vq_embed_dim=8, vq_channels=32, vq_multiplier=(1, 1, 2), image_token_id=5, context=1024):
    """A JanusConfig with explicit sub-configs (JanusConfig() alone is a generic 7B Llama)."""
    from transformers import JanusConfig, JanusVisionConfig, JanusVQVAEConfig, LlamaConfig

    text = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                       max_position_embeddings=context, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    vision = JanusVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                               image_size=grid * patch, patch_size=patch, num_image_tokens=grid * grid,
                               projection_dim=hidden)
    vq = JanusVQVAEConfig(embed_dim=vq_embed_dim, num_embeddings=codebook, latent_channels=32,
                          base_channels=vq_channels, channel_multiplier=list(vq_multiplier), num_res_blocks=1,
                          num_patches=grid, image_token_embed_dim=hidden, projection_dim=hidden)
    return JanusConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), vq_config=vq.to_dict(),
                       image_token_id=image_token_id)


def set_generation_defaults(model, tokenizer, guidance_scale, temperature):
    """Image-mode generate needs boi_token_id in generation_kwargs; the sampling defaults travel with the model."""
    gen = model.generation_config
    gen.generation_kwargs = {**(getattr(gen, "generation_kwargs", None) or {}), "boi_token_id": special_ids(tokenizer)["boi"]}
    gen.guidance_scale, gen.temperature, gen.do_sample = guidance_scale, temperature, True
    gen.pad_token_id, gen.bos_token_id = tokenizer.pad_token_id, tokenizer.bos_token_id
    gen._from_model_config = False  # else save_pretrained drops generation_kwargs


def build_tiny_janus(seed=0):
    """A seeded, tiny, random Janus-Pro look-alike and its tokenizer, built in-process for smoke runs and tests."""
    from transformers import JanusForConditionalGeneration

    words = sorted({w for t in DEFAULT_TEMPLATES for w in t.replace("{}", "").split()}
                   | set(COMMON_CONCEPTS) | {"real", "red", "green", "blue", "yellow", "drawing"}
                   | {"is", "there", "in", "this", "answer", "yes", "no", "or", "?", "what"})
    tokenizer = word_tokenizer(words)
    config = janus_config(len(tokenizer), image_token_id=tokenizer.convert_tokens_to_ids("<image_placeholder>"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = JanusForConditionalGeneration(config)
    set_generation_defaults(model, tokenizer, guidance_scale=5.0, temperature=1.0)
    return model, tokenizer


def toy_model_dir():
    return Path(__file__).resolve().with_name("toy_model")


def resolve_model(name):
    """'toy' is the trained toy model next to this file; 'tiny' and anything else stay as they are."""
    if name == "toy":
        if not (toy_model_dir() / "config.json").exists():
            raise SPMError(f"the toy model is not at {toy_model_dir()}: build it with `python toy_janus.py`", 1)
        return str(toy_model_dir())
    return name


HUB_HINT = "pass a hub id such as deepseek-community/Janus-Pro-1B, a local directory in transformers' Janus format, " \
           "or --model tiny"


@functools.lru_cache(maxsize=None)
def hub_kwargs(name):
    """from_pretrained's keywords: {} to load as usual (a directory, or a hub id the hub answers for), or
    local_files_only when the hub cannot be reached and the cache holds the model. One request with a short timeout
    (HF_HUB_ETAG_TIMEOUT, 3 s here) and no retries: offline, from_pretrained would retry for about 30 s first."""
    if Path(name).expanduser().is_dir():
        return {}
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url, try_to_load_from_cache
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, HFValidationError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    try:
        cached = isinstance(try_to_load_from_cache(name, "config.json"), str)
    except HFValidationError:
        raise SPMError(f"--model {name}: not a local directory, nor a hub id (org/name); {HUB_HINT}", 2) from None
    where = f"the local cache ({constants.HF_HUB_CACHE})"
    if constants.HF_HUB_OFFLINE:
        if cached:
            return {"local_files_only": True}
        raise SPMError(f"--model {name}: HF_HUB_OFFLINE is set and {where} does not hold it; download it first, or "
                       f"{HUB_HINT}", 1)
    try:
        get_hf_file_metadata(hf_hub_url(name, "config.json"), timeout=float(os.environ.get("HF_HUB_ETAG_TIMEOUT", 3)))
        return {}
    except GatedRepoError:  # before its parent class, RepositoryNotFoundError
        raise SPMError(f"--model {name} is gated on the hub: accept its terms on the model page and log in with "
                       f"`hf auth login`", 1) from None
    except RepositoryNotFoundError:
        raise SPMError(f"--model {name}: no such local directory or model on the hub (a private one needs "
                       f"`hf auth login`); {HUB_HINT}", 2) from None
    except (EntryNotFoundError, RevisionNotFoundError):
        raise SPMError(f"--model {name} has no config.json on the hub: not a checkpoint in transformers' format; "
                       f"{HUB_HINT}", 2) from None
    except Exception as e:  # no network, DNS, proxy, timeout, a hub outage
        if cached:
            return {"local_files_only": True}
        reason = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
        raise SPMError(f"--model {name}: cannot reach the Hugging Face hub ({reason}) and {where} does not hold it; "
                       f"download it where there is network, or {HUB_HINT}", 1) from None


def load_config(name):
    """The model's JanusConfig, read before any weights, so that bad layer ids fail fast."""
    name = resolve_model(name)
    if name == "tiny":
        return build_tiny_janus()[0].config
    if (name.startswith((".", "/", "~")) or os.sep in name.strip("/").split("/", 1)[-1]) and not Path(name).expanduser().is_dir():
        raise SPMError(f"--model {name}: no such directory; pass a local directory in transformers' Janus format, "
                       f"a hub id such as deepseek-community/Janus-Pro-1B, or tiny / toy", 2)
    kwargs = hub_kwargs(name)  # before transformers is imported: a missing model fails in a second or two
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name, **kwargs)
    except Exception as e:  # not a Janus checkpoint, a broken config
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SPMError(f"cannot load model {name!r} ({first_line}); {HUB_HINT}", 2) from None


def pick_device(device="auto"):
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SPMError("--device cuda, but this machine has no CUDA device: use --device cpu or auto", 2)
    return device


def set_threads(threads, config, device):
    """0 = one CPU thread for narrow models, whose small matmuls gain nothing from more threads and slow down
    many times over when another process loads the CPU; torch's default otherwise."""
    if threads:
        torch.set_num_threads(threads)
    elif device == "cpu" and config.text_config.hidden_size < 512:
        torch.set_num_threads(1)


def load_model(name, dtype="float32", device="cpu"):
    """(model, tokenizer), every base weight frozen."""
    name = resolve_model(name)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    if name == "tiny":
        model, tokenizer = build_tiny_janus()
        model = model.to(torch_dtype)
    else:
        from transformers import AutoTokenizer, JanusForConditionalGeneration

        load_config(name)  # one-line error for a model that cannot be found
        tokenizer = AutoTokenizer.from_pretrained(name, **hub_kwargs(name))
        model = JanusForConditionalGeneration.from_pretrained(name, dtype=torch_dtype, **hub_kwargs(name))
        gen = model.generation_config
        if "boi_token_id" not in (getattr(gen, "generation_kwargs", None) or {}):
            set_generation_defaults(model, tokenizer, gen.guidance_scale or 5.0, gen.temperature or 1.0)
    model.requires_grad_(False).eval().to(device)
    return model, tokenizer


def image_token_ids(tokenizer):
    """(<begin_of_image>, <end_of_image>) ids: they tell generation positions from an image being understood."""
    return tuple(tokenizer.convert_tokens_to_ids(t) for t in (tokenizer.boi_token, tokenizer.eoi_token))


def special_ids(tokenizer):
    return {"boi": tokenizer.convert_tokens_to_ids(tokenizer.boi_token), "pad": tokenizer.pad_token_id,
            "bos": tokenizer.bos_token_id, "unk": tokenizer.unk_token_id}


def generation_defaults(model):
    """(cfg, temperature) of the model's generation config: 5 and 1 for Janus-Pro."""
    gen = model.generation_config
    return float(gen.guidance_scale or 5.0), float(gen.temperature if gen.temperature is not None else 1.0)


# -----------------------------------------------------------------------------
# Prompts, sampling and the one teacher-forced pass


def format_prompt(prompt, tokenizer):
    return f"<|User|>: {prompt}\n\n<|Assistant|>:{tokenizer.boi_token}"


def encode_prompts(tokenizer, prompts, device="cpu", max_length=None):
    """Left-padded (input_ids, attention_mask) [B, T], each row ending with <begin_of_image>."""
    # Left whatever the tokenizer says: a converted tokenizer that pads on the right would put pads between a short
    # prompt and its image, which starts at the last column of every row.
    batch = tokenizer([format_prompt(p, tokenizer) for p in prompts], return_tensors="pt", padding=True,
                      padding_side="left")
    if max_length is not None and batch.input_ids.shape[1] > max_length:
        raise SPMError(f"prompt of {batch.input_ids.shape[1]} tokens is longer than the model's context of "
                       f"{max_length} minus the image: shorten it", 2)
    return batch.input_ids.to(device), batch.attention_mask.to(device)


def unconditional_ids(input_ids, tokenizer):
    """The CFG unconditional prompt, as native generate builds it: everything but BOS and BOI becomes pad."""
    ids = special_ids(tokenizer)
    keep = (input_ids == ids["bos"]) | (input_ids == ids["boi"])
    return torch.where(keep, input_ids, torch.full_like(input_ids, ids["pad"]))


def positions(attention_mask):
    # Rows are left-padded; positions as if unpadded, so a padded prompt sees what an unpadded one sees.
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def derived_seed(*parts):
    """A seed from (seed, step, index, ...), the same in every process (Python's hash() of a str is not)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


def rollout_uniforms(seed, step, first_index, count, num_tokens, device="cpu"):
    """One uniform per image token per sample, seeded by (seed, step, sample index): sampled by inverse CDF with
    these, a sample does not depend on the batch it is in."""
    rows = []
    for index in range(first_index, first_index + count):
        generator = torch.Generator().manual_seed(derived_seed(seed, step, index, "rollout"))
        rows.append(torch.rand(num_tokens, generator=generator, dtype=torch.float64))
    return torch.stack(rows).to(device)


@torch.no_grad()
def sample_codes(model, prompt_embeds, uncond_embeds, attention_mask, cfg, temperature, uniforms=None):
    """Image codes [B, N] with CFG and a KV cache. cfg: a float or one scale per row [B, 1]; uniforms [B, N] in
    [0, 1) (None = greedy)."""
    from transformers import DynamicCache

    language_model, head = model.model.language_model, model.model.generation_head
    batch, num_tokens = prompt_embeds.shape[0], model.config.vision_config.num_image_tokens
    embeds = torch.cat([prompt_embeds, uncond_embeds])  # [2B, T, D], conditional rows first
    mask = torch.cat([attention_mask, attention_mask])
    position_ids = positions(mask)
    cache = DynamicCache(config=language_model.config)
    codes = torch.zeros(batch, num_tokens, dtype=torch.long, device=embeds.device)
    for i in range(num_tokens):
        hidden = language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids,
                                cache=cache, use_cache=True).last_hidden_state[:, -1]
        logits = head(hidden).float()  # [2B, V]
        cond, uncond = logits.chunk(2)
        logits = uncond + cfg * (cond - uncond)
        if uniforms is None or temperature == 0:
            codes[:, i] = logits.argmax(-1)
        else:
            cdf = torch.softmax(logits.double() / temperature, -1).cumsum(-1)
            u = uniforms[:, i:i + 1].to(cdf) * cdf[:, -1:]
            codes[:, i] = torch.searchsorted(cdf, u).squeeze(1).clamp(max=logits.shape[-1] - 1)
        embeds = model.prepare_embeddings_for_image_generation(codes[:, i].repeat(2))[:, None]
        mask = torch.cat([mask, mask.new_ones(2 * batch, 1)], 1)
        position_ids = position_ids[:, -1:] + 1
    return codes


@torch.no_grad()
def sample_prompts(model, tokenizer, prompts, seeds, cfg, temperature):
    """Codes [len(prompts), len(seeds), N], each (prompt, seed) sampled independently of the batch; a seed gives
    every prompt the same random numbers, so base and erased pictures of one seed compare directly."""
    input_ids, mask = encode_prompts(tokenizer, [p for p in prompts for _ in seeds], next(model.parameters()).device)
    embed, num_tokens = model.get_input_embeddings(), model.config.vision_config.num_image_tokens
    uniforms = torch.cat([rollout_uniforms(seed, 0, 0, 1, num_tokens) for _ in prompts for seed in seeds])
    codes = sample_codes(model, embed(input_ids), embed(unconditional_ids(input_ids, tokenizer)), mask, cfg,
                         temperature, uniforms.to(mask.device))
    return codes.view(len(prompts), len(seeds), -1)


def image_hidden(model, prompt_embeds, attention_mask, codes):
    """The last hidden states [B, N, D] of every image step from ONE teacher-forced pass (row i predicts codes[:, i])."""
    batch, prompt_len = attention_mask.shape
    image_embeds = model.prepare_embeddings_for_image_generation(codes[:, :-1])  # [B, N-1, D]
    embeds = torch.cat([prompt_embeds, image_embeds.to(prompt_embeds.dtype)], 1)
    mask = torch.cat([attention_mask, attention_mask.new_ones(batch, codes.shape[1] - 1)], 1)
    hidden = model.model.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions(mask),
                                        use_cache=False).last_hidden_state
    return hidden[:, prompt_len - 1:]


def image_logits(model, prompt_embeds, attention_mask, codes, hidden=False):
    """Logits [B, N, V] of every image step from ONE teacher-forced pass; row i predicts codes[:, i]. hidden: the
    hidden states instead, in float32."""
    states = image_hidden(model, prompt_embeds, attention_mask, codes)
    return states.float() if hidden else model.model.generation_head(states).float()


def batched_image_logits(model, parts, hidden=False):
    """One teacher-forced pass over several row groups [(embeds, mask, codes), ...] of one prompt length."""
    embeds, mask, codes = (torch.cat([p[i] for p in parts]) for i in range(3))
    return image_logits(model, embeds, mask, codes, hidden).split([p[0].shape[0] for p in parts])


# -----------------------------------------------------------------------------
# Targets, divergences, likelihoods


def cfg_combine(cond, uncond, scale):
    return uncond + scale * (cond - uncond)


def erasure_target(concept_logits, surrogate_logits, eta):
    """SPM's target on teacher logits, t = l(surrogate) - eta * (l(concept) - l(surrogate)): eta 0 maps the concept
    onto the surrogate, a larger eta pushes further away from the concept."""
    return surrogate_logits - eta * (concept_logits - surrogate_logits)


def divergence(student, target, loss="kl", direction="forward"):
    """Mean over rows and image steps of KL(target||student) (forward), KL(student||target) (reverse), or MSE."""
    if loss in ("mse", "hidden"):
        return F.mse_loss(student, target)
    log_s, log_t = F.log_softmax(student, -1), F.log_softmax(target, -1)
    if direction == "forward":
        return (log_t.exp() * (log_t - log_s)).sum(-1).mean()
    return (log_s.exp() * (log_s - log_t)).sum(-1).mean()


def code_log_likelihood(cond_logits, uncond_logits, codes, cfg, temperature):
    """Mean log-probability per image token [B] of `codes` under what is sampled: CFG, then temperature."""
    combined = cfg_combine(cond_logits, uncond_logits, cfg) / (temperature if temperature > 0 else 1.0)
    return F.log_softmax(combined, -1).gather(-1, codes[..., None]).squeeze(-1).mean(-1)


def cfg_log_likelihood(model, prompt_embeds, uncond_embeds, attention_mask, codes, cfg, temperature):
    """code_log_likelihood [B] from one teacher-forced pass over the conditional and unconditional rows."""
    logits = image_logits(model, torch.cat([prompt_embeds, uncond_embeds]), torch.cat([attention_mask] * 2),
                          torch.cat([codes] * 2))
    return code_log_likelihood(*logits.chunk(2), codes, cfg, temperature)


@torch.no_grad()
def prompt_log_likelihood(model, tokenizer, prompts, codes, cfg, temperature):
    """[P] mean log-likelihood per image token of each prompt's pictures codes [P, S, N] given the prompt."""
    rows = [p for p in prompts for _ in range(codes.shape[1])]
    input_ids, mask = encode_prompts(tokenizer, rows, next(model.parameters()).device)
    embed = model.get_input_embeddings()
    return cfg_log_likelihood(model, embed(input_ids), embed(unconditional_ids(input_ids, tokenizer)), mask,
                              codes.flatten(0, 1), cfg, temperature).view(len(prompts), -1).mean(1)


# -----------------------------------------------------------------------------
# Words: what a tokenizer spells, augmented templates, the concept's own tokens in a prompt


def known_concepts(tokenizer, concepts):
    """The concepts the tokenizer spells without <unk> (a word-level toy vocabulary lacks most words)."""
    unk = tokenizer.unk_token_id
    return [c for c in concepts if unk is None or unk not in tokenizer(c, add_special_tokens=False).input_ids]


def vocabulary_words(tokenizer, words=AUGMENT_WORDS + COMMON_CONCEPTS + PUNCTUATION):
    return known_concepts(tokenizer, list(dict.fromkeys(words)))


def augment_template(template, words, generator, max_edits=3):
    """A random edit of a template that keeps its one {}: 1 to max_edits insertions of a word from `words`,
    deletions of another word, swaps of neighbours, a shuffle, or punctuation."""
    def randint(n):
        return int(torch.randint(n, (), generator=generator))

    tokens = template.split()
    for _ in range(1 + randint(max_edits)):
        edit = randint(6)
        others = [i for i, t in enumerate(tokens) if t != "{}"]
        if edit in (0, 1) or not others:  # insertions are the commonest edit: new context
            tokens.insert(randint(len(tokens) + 1), words[randint(len(words))])
        elif edit == 2:
            del tokens[others[randint(len(others))]]
        elif edit == 3 and len(tokens) > 1:
            i = randint(len(tokens) - 1)
            tokens[i], tokens[i + 1] = tokens[i + 1], tokens[i]
        elif edit == 4:
            tokens = [tokens[i] for i in torch.randperm(len(tokens), generator=generator).tolist()]
        else:
            tokens.insert(randint(len(tokens) + 1), PUNCTUATION[randint(len(PUNCTUATION))])
    return " ".join(tokens)


def concept_columns(tokenizer, text, concept, start=0, stop=None):
    """Indices of the tokens of tokenizer(text, add_special_tokens=False) that spell the last whole-word occurrence
    of `concept` (any case) in text[start:stop], or None. By character offsets: byte-level BPE spells a word by its
    context (' Mickey' is 'ĠMickey' after a space, 'Mickey' after '('), so only the prompt's own tokens will do."""
    hits = list(re.finditer(rf"(?<!\w){re.escape(concept)}(?!\w)", text[start:stop], re.IGNORECASE))
    if not hits:
        return None
    begin, end = start + hits[-1].start(), start + hits[-1].end()
    try:
        offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True).offset_mapping
    except NotImplementedError:  # a slow tokenizer has no offsets: look for the concept's ids, spelt as a word
        ids = tokenizer(text, add_special_tokens=False).input_ids
        word = tokenizer(f" {text[begin:end]}", add_special_tokens=False).input_ids
        found = [i for i in range(len(ids) - len(word), -1, -1) if ids[i:i + len(word)] == word]
        return list(range(found[0], found[0] + len(word))) if found else None
    return [i for i, (s, e) in enumerate(offsets) if s < end and e > begin and e > s] or None


def concept_token_positions(tokenizer, prompts, concepts, input_ids):
    """Columns in input_ids [B, T] (from encode_prompts(prompts)) of each row's concept tokens; [] where absent."""
    start = format_prompt("\0", tokenizer).index("\0")  # the prompt's span: never match inside the template
    result = []
    for prompt, concept, row in zip(prompts, concepts, input_ids.tolist()):
        text = format_prompt(prompt, tokenizer)
        columns = concept_columns(tokenizer, text, concept, start, start + len(prompt)) or []
        shift = len(row) - len(tokenizer(text, add_special_tokens=False).input_ids)  # BOS and left padding
        result.append([shift + c for c in columns])
    return result


def latent_anchor_embeds(cond_embeds, columns, generator):
    """SPM's latent anchoring in the LLM's input-embedding space: at `columns` of each row, the concept's token
    embeddings become random vectors of 0.8-1.2x their norm, each accepted with probability 1 - cos(concept, noise)."""
    anchors = cond_embeds.detach().clone()
    for row, cols in enumerate(columns):
        for col in cols:
            target = cond_embeds[row, col].detach().float().cpu()
            while True:
                noise = torch.randn(target.shape, generator=generator)
                noise = noise / noise.norm() * target.norm() * (0.8 + 0.4 * torch.rand((), generator=generator))
                if torch.rand((), generator=generator) < 1 - F.cosine_similarity(target, noise, 0):
                    break
            anchors[row, col] = noise.to(anchors)
    return anchors


# -----------------------------------------------------------------------------
# Soft prompts: the adversary of --adversarial soft, and attack.py's


def soft_prompt_inputs(model, tokenizer, soft):
    """Janus' text-to-image format with the prompt text replaced by free input embeddings soft [K, D]: one row of
    (prompt_embeds, uncond_embeds, mask); the unconditional row pads the soft positions as CFG pads text."""
    before, after = format_prompt("\x00", tokenizer).split("\x00")
    device, embed = soft.device, model.get_input_embeddings()
    head = tokenizer(before, return_tensors="pt").input_ids.to(device)  # BOS and the user turn
    tail = tokenizer(after, add_special_tokens=False, return_tensors="pt").input_ids.to(device)
    ids = torch.cat([head, torch.full((1, soft.shape[0]), tokenizer.pad_token_id, device=device), tail], 1)
    cond = torch.cat([embed(head), soft[None].to(embed.weight.dtype), embed(tail)], 1)
    return cond, embed(unconditional_ids(ids, tokenizer)), torch.ones_like(ids)


def optimise_soft_prompt(model, tokenizer, codes, tokens=4, steps=200, lr=1e-2, cfg=5.0, temperature=1.0,
                         generator=None, init=None, objective="cfg", snapshots=()):
    """Concept inversion: `tokens` free input embeddings (from `init` [tokens, D], or random vocabulary embeddings),
    optimised with Adam to maximise the likelihood of the pictures `codes` [R, N] under the model as it is (membranes
    on or off): of what is sampled (objective cfg: CFG, then temperature) or of the raw conditional logits (cond).
    Returns (soft [tokens, D], its final mean log-likelihood), and with `snapshots` (Adam step counts) also
    {step: (soft, log-likelihood)} at each of them."""
    weight = model.get_input_embeddings().weight
    if init is None:
        init = weight[torch.randint(weight.shape[0], (tokens,), generator=generator).to(weight.device)]
    soft = init.detach().float().clone().requires_grad_(True)
    rows = codes.shape[0]
    with torch.no_grad():  # the unconditional row does not see the soft prompt: its logits are fixed
        _, uncond, mask = soft_prompt_inputs(model, tokenizer, soft)
        uncond_logits = image_logits(model, uncond.expand(rows, -1, -1), mask.expand(rows, -1), codes)
    optimizer = torch.optim.Adam([soft], lr=lr)

    def log_likelihood():
        cond = image_logits(model, soft_prompt_inputs(model, tokenizer, soft)[0].expand(rows, -1, -1),
                            mask.expand(rows, -1), codes)
        if objective == "cond":
            return F.log_softmax(cond, -1).gather(-1, codes[..., None]).mean()
        return code_log_likelihood(cond, uncond_logits, codes, cfg, temperature).mean()

    taken = {}
    for step in range(steps + 1):
        if step in snapshots:
            with torch.no_grad():
                taken[step] = (soft.detach().clone(), log_likelihood().item())
        if step == steps:
            break
        soft.grad, = torch.autograd.grad(-log_likelihood(), [soft])  # nothing else, membranes included, gets a grad
        optimizer.step()
    with torch.no_grad():
        final = log_likelihood().item()
    return (soft.detach(), final, taken) if snapshots else (soft.detach(), final)


# -----------------------------------------------------------------------------
# The trainer: one step = rollout -> teacher -> target -> student loss -> update; levers plug in


class Rows(NamedTuple):
    """Rows start:stop of a step's batch, with their conditional or unconditional prompt, and whose rollout."""
    start: int
    stop: int
    unconditional: bool = False
    codes: str = "concept"


class Batch:
    """The prompts of one step, tokenised together so that every row has one length and the images line up. rows:
    'concept'; 'surrogate' (a substitute's own rows, or for the empty surrogate the concept rows' unconditional
    prompt); and each lever that adds prompts, under its name. streams: the sampled groups' rollout-noise offsets."""

    def __init__(self, trainer, picks):
        c, B = trainer.config, trainer.config.batch_size
        self.picks, self.prompts = picks, [t.format(concept) for concept, t in picks]
        self.rows, self.streams = {"concept": Rows(0, B)}, {"concept": 0}
        if c.surrogate:  # a substitute, or '-': the same prompt without the concept's word
            self.rows["surrogate"] = Rows(B, 2 * B)
            self.prompts += [" ".join(t.format("").split()) if c.surrogate == "-" else t.format(c.surrogate)
                             for _, t in picks]
        else:
            self.rows["surrogate"] = Rows(0, B, unconditional=True)
        for lever in trainer.levers:
            extra = lever.prompts(trainer, picks)
            if extra:
                self.rows[lever.name] = Rows(len(self.prompts), len(self.prompts) + len(extra), codes=lever.name)
                self.streams[lever.name] = lever.stream
                self.prompts += extra
        self.input_ids, self.mask = encode_prompts(trainer.tokenizer, self.prompts, trainer.device, trainer.context)
        self.cond = trainer.embed(self.input_ids)  # [R, T, D]
        self.uncond = trainer.embed(unconditional_ids(self.input_ids, trainer.tokenizer))  # the empty prompt
        for lever in trainer.levers:
            lever.edit(trainer, self)

    @property
    def groups(self):
        """The row groups with teacher and student logits: the concept and every lever's."""
        return [name for name in self.rows if name != "surrogate"]

    def view(self, name, unconditional=False):
        rows = self.rows[name]
        return rows._replace(unconditional=rows.unconditional or unconditional)


class Step(NamedTuple):
    """What a step computed, for the levers: codes and distributions are group name -> [rows, N(, V)]."""
    batch: Batch
    codes: dict
    teacher: dict
    student: dict
    target: torch.Tensor


class Lever:
    """A plug-in of Trainer.step; override what it needs. prompts(): prompts it adds to the batch (sampled, with
    teacher and student logits under its name); edit(): changes its rows' input embeddings; adversaries(): pairs
    (student distribution, erasure target) erased like the concept prompt's; loss(): its own term, added with
    `weight`; updated(): after each optimiser step, metrics to log; published(): a context in which the membranes
    hold what a checkpoint saves. Its state is saved with the trainer for --resume."""
    name, weight, stream = "lever", 1.0, None  # stream: offset of its rows' sample indices in the rollout noise
    adversarial = False  # its loss attacks the membranes first: --select-every's judge-free score leaves it out

    def prompts(self, trainer, picks):
        return []

    def edit(self, trainer, batch):
        pass

    def adversaries(self, trainer, step):
        return []

    def loss(self, trainer, step):
        return None

    def updated(self, trainer):
        return {}

    def published(self, trainer):
        return contextlib.nullcontext()

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


class Anchoring(Lever):
    """weight * KL(teacher || student) on rollouts of anchor rows: --anchor-prompts in the training templates
    (prompts), or the concept prompts with the concept's token embeddings replaced by norm-matched random vectors
    (latent: SPM's latent anchoring, no list of concepts needed)."""
    name, stream = "anchor", 10 ** 9  # anchor rows never draw the rollout noise of a concept row

    def __init__(self, config):
        self.kind, self.weight = config.anchor, config.anchor_weight

    def prompts(self, trainer, picks):
        if self.kind == "latent":
            return [t.format(concept) for concept, t in picks]
        return [t.format(concept) for concept, t in trainer.pick(trainer.config.anchor_prompts, "anchor")]

    def edit(self, trainer, batch):
        if self.kind == "latent":
            rows = batch.rows[self.name]
            columns = concept_token_positions(trainer.tokenizer, batch.prompts[rows.start:rows.stop],
                                              [c for c, _ in batch.picks], batch.input_ids[rows.start:rows.stop])
            batch.cond = batch.cond.clone()
            for i, cols in enumerate(columns):
                row = rows.start + i
                batch.cond[row:row + 1] = latent_anchor_embeds(batch.cond[row:row + 1], [cols],
                                                               trainer.generator(trainer.first_index + i, "latent"))

    def loss(self, trainer, step):
        return anchor_divergence(trainer.config, step.student[self.name], step.teacher[self.name])


def anchor_divergence(config, student, teacher):
    """An anchor's term: KL(teacher || student) on logits (whatever --loss compares for the erasure), MSE on hidden
    states, which KL does not compare."""
    return divergence(student, teacher, "hidden" if config.loss == "hidden" else "kl", config.kl_direction)


def tokenizer_words(tokenizer):
    """The tokenizer's own whole words, sorted: its tokens that decode to a lower-case ASCII word of 3+ letters."""
    special = set(tokenizer.all_special_ids)
    words = {tokenizer.decode([i]).strip() for i in range(len(tokenizer)) if i not in special}
    return sorted(w for w in words if len(w) >= 3 and w.isascii() and w.isalpha() and w.islower())


@torch.no_grad()
def vocabulary_anchors(trainer, size, exclude=()):
    """(anchor words, words left out as the concept's) of --anchor-vocabulary: `size` of the tokenizer's words (a
    seeded draw) that are not the concepts, their anchors or `exclude`, minus every word that draws a concept: one
    whose prompt lifts the teacher's log-likelihood of the concept's pictures above the median word's by at least
    half as much as the concept's own word does."""
    c = trainer.config
    own = set(c.concept) | set(c.anchor_prompts or []) | set(exclude)
    words = [w for w in tokenizer_words(trainer.tokenizer) if w not in own]
    if len(words) > size:
        generator = torch.Generator().manual_seed(derived_seed(c.seed, "vocabulary"))
        words = [words[i] for i in sorted(torch.randperm(len(words), generator=generator)[:size].tolist())]
    draws = set()
    for concept in c.concept:
        pictures = teacher_pictures(trainer, concept)
        prompts = [c.templates[0].format(w) for w in words + [concept]]
        chunks = [prompts[i:i + 16] for i in range(0, len(prompts), 16)]  # 16 prompts x the pictures per pass
        with trainer.membranes.disabled():
            scores = torch.cat([prompt_log_likelihood(trainer.model, trainer.tokenizer, chunk,
                                                      pictures[None].expand(len(chunk), -1, -1), c.cfg,
                                                      c.temperature) for chunk in chunks])
        median = scores[:-1].median()
        gain = (scores[:-1] - median) / (scores[-1] - median).clamp_min(1e-6)
        draws |= {w for w, g in zip(words, gain.tolist()) if g >= 0.5}
    return [w for w in words if w not in draws], sorted(draws)


def teacher_pictures(trainer, concept):
    """The adversaries' concept pictures: the teacher's samples [R, N] of every training template, at least 8."""
    c = trainer.config
    with trainer.membranes.disabled():
        return sample_prompts(trainer.model, trainer.tokenizer, [t.format(concept) for t in c.templates],
                              list(range(max(1, -(-8 // len(c.templates))))), c.cfg, c.temperature).flatten(0, 1)


def cached_pictures(references, trainer, name):
    """references[name]: the teacher's pictures of `name` (teacher_pictures), drawn at the first call only."""
    if name not in references:
        references[name] = teacher_pictures(trainer, name)
    return references[name]


def row_picks(trainer, sizes, purpose):
    """For each row i of the step, an index below sizes[i] from the row's own seeded generator."""
    return [int(torch.randint(n, (), generator=trainer.generator(trainer.first_index + i, purpose)))
            for i, n in enumerate(sizes)]


def concept_picture_picks(trainer, batch, references, purpose):
    """Per row of the step, one of its concept's `references` pictures (row_picks): [B, N]."""
    picks = row_picks(trainer, [len(references[concept]) for concept, _ in batch.picks], purpose)
    return torch.stack([references[concept][k] for (concept, _), k in zip(batch.picks, picks)])


def adversary_pictures(trainer, step, references, codes_from=None):
    """What the adversaries' rows are teacher-forced on, (codes [B, N], erasure target): the concept rows' rollout
    and the step's target, or (--adversary-codes concept, or codes_from concept) per row one of the concept's
    `references` pictures and the teacher's target on it: where an attack that draws the concept has to pass."""
    c, batch = trainer.config, step.batch
    if (codes_from or c.adversary_codes) == "rollout":
        return step.codes["concept"], step.target
    codes = concept_picture_picks(trainer, batch, references, "adversary-codes")
    with torch.no_grad(), trainer.membranes.disabled():
        teacher = trainer.distributions(batch, {**step.codes, "concept": codes}, ["concept", "surrogate"])
    return codes, erasure_target(teacher["concept"], teacher["surrogate"], c.eta)


class SoftPromptAdversary(Lever):
    """--adversarial soft (AdvUnlearn-style): every --adversarial-every steps a soft prompt per concept is optimised
    against the current membranes to draw the concept's pictures (the teacher's samples), warm-started from the last
    one; the student's distribution on it is trained towards the erasure target like the concept prompt's. With
    --adversary-pool K the concept keeps K prompts from distinct random starts, each attack re-optimises the next in
    turn, and the student is trained on every one of them: a population, not one prompt the membranes can outrun."""
    name = "soft"

    def __init__(self, config):
        self.pool, self.references = {}, {}  # concept -> its soft prompts [[tokens, D], ...], its pictures [R, N]

    def adversaries(self, trainer, step):
        c, model, tokenizer = trainer.config, trainer.model, trainer.tokenizer
        for concept in c.concept:
            cached_pictures(self.references, trainer, concept)
            if trainer.step_count % c.adversarial_every == 0:
                pool = self.pool.setdefault(concept, [])
                slot = trainer.step_count // c.adversarial_every % c.adversary_pool
                generator = torch.Generator().manual_seed(derived_seed(c.seed, trainer.step_count, concept, "soft"))
                init = pool[slot].to(trainer.device) if slot < len(pool) else None  # a new slot: a random start
                with torch.enable_grad():
                    soft, _ = optimise_soft_prompt(
                        model, tokenizer, self.references[concept], c.adversarial_tokens, c.adversarial_steps, 1e-2,
                        c.cfg, c.temperature, generator, init)
                pool[slot:slot + 1] = [soft]
        members = min(len(self.pool[concept]) for concept, _ in step.batch.picks)
        inputs = [soft_prompt_inputs(model, tokenizer, self.pool[concept][m].to(trainer.device))
                  for m in range(members) for concept, _ in step.batch.picks]
        cond, uncond, mask = (torch.cat(parts) for parts in zip(*inputs))
        B, (codes, target) = len(step.batch.picks), adversary_pictures(trainer, step, self.references)
        hidden = c.loss == "hidden"
        # the unconditional row pads the soft positions, so it is the same for every member: one pass for all
        uncond_logits = image_logits(model, uncond[:B], mask[:B], codes) if c.loss_on == "cfg" else None
        logits = image_logits(model, cond, mask, codes.repeat(members, 1), hidden).split(B)
        return [(trainer.distribution(part, uncond_logits), target) for part in logits]

    def state_dict(self):
        return {"soft": {c: torch.stack(pool).cpu() for c, pool in self.pool.items()}}

    def load_state_dict(self, state):  # a checkpoint of one warm-started prompt holds [tokens, D]
        self.pool = {c: list(t) if t.dim() == 3 else [t] for c, t in state.get("soft", {}).items()}


@contextlib.contextmanager
def residual_perturbation(model, layer, delta):
    """Adds delta [B, P, D] to the residual stream entering decoder `layer` at the first P positions of B-row passes
    (other passes are left alone); removed on exit, whatever happens."""
    def add(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if hidden.shape[0] != delta.shape[0]:
            return None
        P = delta.shape[1]
        hidden = torch.cat([hidden[:, :P] + delta.to(hidden.dtype), hidden[:, P:]], 1)
        return ((hidden,) + tuple(args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})

    handle = model.model.language_model.layers[layer].register_forward_pre_hook(add, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def residual_norms(model, layer, embeds, mask, codes=None):
    """The norm [B, P] of the residual stream entering decoder `layer` at every prompt position; with codes [B, N],
    at every position [B, P + N - 1] of the pass teacher-forced on them."""
    seen = {}

    def keep(module, args, kwargs):
        seen["h"] = (args[0] if args else kwargs["hidden_states"]).detach()

    handle = model.model.language_model.layers[layer].register_forward_pre_hook(keep, with_kwargs=True)
    try:
        with torch.no_grad():
            if codes is None:
                model.model.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions(mask),
                                           use_cache=False)
            else:
                image_hidden(model, embeds, mask, codes)
    finally:
        handle.remove()
    return seen["h"].float().norm(dim=-1)


def latent_attack(model, layer, embeds, mask, codes, eps, steps, where="prompt"):
    """PGD: a perturbation of the residual stream entering decoder `layer`, at the prompt positions ([B, P, D]), or
    (where image, prompt+image) at the image positions of the pass teacher-forced on the pictures `codes` [B, N] too
    ([B, P + N - 1, D], zero where it does not act), each position's at most eps times that position's norm, that
    raises the mean log-likelihood of `codes` under the model as it is (membranes on or off). Nothing but the
    perturbation gets a gradient."""
    if where == "prompt":
        radius = (eps * residual_norms(model, layer, embeds, mask))[..., None]  # [B, P, 1]
    else:
        radius = (eps * residual_norms(model, layer, embeds, mask, codes))[..., None]  # [B, P + N - 1, 1]
        if where == "image":  # from the first picture token on; <begin_of_image> is the prompt's last position
            radius[:, :embeds.shape[1]] = 0
    delta = radius.new_zeros(*radius.shape[:2], embeds.shape[-1])
    for _ in range(steps):
        delta.requires_grad_(True)
        with torch.enable_grad(), residual_perturbation(model, layer, delta):
            logits = image_logits(model, embeds, mask, codes)
            grad, = torch.autograd.grad(F.log_softmax(logits, -1).gather(-1, codes[..., None]).mean(), [delta])
        with torch.no_grad():  # an ascent step of 2.5 / steps of the radius, projected back onto the ball
            delta = delta + 2.5 / steps * radius * grad / grad.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            delta = delta * (radius / delta.norm(dim=-1, keepdim=True).clamp_min(1e-12)).clamp(max=1.0)
    return delta.detach()


class LatentAdversary(Lever):
    """--latent-eps (latent adversarial training, Sheshadri, Casper et al. 2024): each step PGD finds an L2-bounded
    perturbation of the residual stream at the concept prompt's positions that raises the likelihood of the concept's
    pictures (the teacher's samples) under the membranes; the student's distribution under it is trained towards the
    erasure target like the concept prompt's. It attacks where a soft prompt acts, at a few passes' cost. With
    --latent-positions image it perturbs the image positions of one of the teacher's concept pictures instead (with
    prompt+image, both), where every attack that draws the concept has to pass, and trains there."""
    name = "latent"

    def __init__(self, config):
        self.references = {}  # concept -> the teacher's pictures [R, N]

    def adversaries(self, trainer, step):
        c, model, batch = trainer.config, trainer.model, step.batch
        B, layer = c.batch_size, model.config.text_config.num_hidden_layers // 2 if c.latent_layer is None \
            else c.latent_layer
        for concept in c.concept:
            cached_pictures(self.references, trainer, concept)
        # attacked on the pictures it is trained on: with --adversary-codes concept, and always where it perturbs
        # image positions, which belong to the picture they were found on
        on_pictures = c.adversary_codes == "concept" or c.latent_positions != "prompt"
        codes, target = adversary_pictures(trainer, step, self.references, "concept" if on_pictures else None)
        if on_pictures:
            references = codes
        else:
            references = concept_picture_picks(trainer, batch, self.references, "latent-adversary")
        delta = latent_attack(model, layer, batch.cond[:B].detach(), batch.mask[:B], references, c.latent_eps,
                              c.latent_steps, c.latent_positions)
        with residual_perturbation(model, layer, delta.detach()):
            perturbed = image_logits(model, batch.cond[:B], batch.mask[:B], codes, c.loss == "hidden")
        uncond_logits = image_logits(model, batch.uncond[:B], batch.mask[:B], codes) if c.loss_on == "cfg" else None
        return [(trainer.distribution(perturbed, uncond_logits), target)]


class VocabularyAnchoring(Anchoring):
    """--anchor-vocabulary N: --anchor's KL(teacher || student), on the training templates filled with words of the
    tokenizer's own (vocabulary_anchors), so that what the erasure takes along is held where nobody named it."""
    name, stream = "vocab", 2 * 10 ** 9

    def __init__(self, config, exclude=()):
        super().__init__(config)
        self.kind, self.size, self.exclude = "prompts", config.anchor_vocabulary, exclude
        self.words = self.left_out = None  # chosen at the first step, from the teacher

    def chosen(self, trainer):
        """The anchor words, drawn from the teacher at the first call."""
        if self.words is None:
            self.words, self.left_out = vocabulary_anchors(trainer, self.size, self.exclude)
        if not self.words:
            raise SPMError("--anchor-vocabulary: every word of this tokenizer drawn was a concept's or an anchor's: "
                           "raise N, or use --anchor-prompts", 2)
        return self.words

    def prompts(self, trainer, picks):
        return [t.format(word) for word, t in trainer.pick(self.chosen(trainer), "vocabulary")]

    def state_dict(self):
        return {} if self.words is None else {"words": self.words, "left_out": self.left_out}

    def load_state_dict(self, state):
        self.words, self.left_out = state.get("words"), state.get("left_out")


class SoftAnchorAdversary(Lever):
    """--adversarial-anchors N: anchors where the erasure is attacked. Every --adversarial-every steps a soft prompt is
    optimised against the current membranes to draw the next anchor's pictures (the teacher's samples), from a random
    start, and replaces the oldest of the N kept; the student's distribution on each kept prompt, teacher-forced on
    one of its anchor's pictures per row, is held to the teacher's on the same prompt and picture with --anchor's
    weight. A soft prompt the membranes deflect from an anchor is found and trained back, named or not. With
    --adversarial-anchors-from vocabulary the attacked anchor is a seeded pick of `vocabulary`'s words instead."""
    name, adversarial = "soft-anchor", True

    def __init__(self, config, vocabulary=None):
        self.weight, self.size, self.vocabulary = config.anchor_weight, config.adversarial_anchors, vocabulary
        self.pool, self.references = [], {}  # [(anchor, soft [tokens, D])], anchor -> its pictures [R, N]

    def next_anchor(self, trainer):
        c, attacks = trainer.config, trainer.step_count // trainer.config.adversarial_every
        if self.vocabulary is None:
            return c.anchor_prompts[attacks % len(c.anchor_prompts)]
        words = self.vocabulary.chosen(trainer)
        generator = torch.Generator().manual_seed(derived_seed(c.seed, trainer.step_count, "soft-anchor-word"))
        return words[int(torch.randint(len(words), (), generator=generator))]

    def attack(self, trainer):
        c, anchor = trainer.config, self.next_anchor(trainer)
        pictures = cached_pictures(self.references, trainer, anchor)
        generator = torch.Generator().manual_seed(derived_seed(c.seed, trainer.step_count, anchor, "soft-anchor"))
        with torch.enable_grad():
            soft, _ = optimise_soft_prompt(trainer.model, trainer.tokenizer, pictures, c.adversarial_tokens,
                                           c.adversarial_steps, 1e-2, c.cfg, c.temperature, generator)
        self.pool = (self.pool + [(anchor, soft)])[-self.size:]

    def loss(self, trainer, step):
        c, B = trainer.config, trainer.config.batch_size
        if trainer.step_count % c.adversarial_every == 0:
            self.attack(trainer)
        parts, codes = [], []
        for k, (anchor, soft) in enumerate(self.pool):
            cond, uncond, mask = soft_prompt_inputs(trainer.model, trainer.tokenizer, soft.to(trainer.device))
            pictures = cached_pictures(self.references, trainer, anchor)  # after --resume: drawn again, the same
            codes.append(pictures[row_picks(trainer, [len(pictures)] * B, f"soft-anchor-{k}")])
            parts.append((cond.expand(B, -1, -1), uncond.expand(B, -1, -1), mask.expand(B, -1)))
        cond, uncond, mask = (torch.cat(p) for p in zip(*parts))
        codes = torch.cat(codes)

        def distribution():
            logits = image_logits(trainer.model, cond, mask, codes, c.loss == "hidden")
            unconditional = image_logits(trainer.model, uncond, mask, codes) if c.loss_on == "cfg" else None
            return trainer.distribution(logits, unconditional)

        with torch.no_grad(), trainer.membranes.disabled():
            teacher = distribution()
        return anchor_divergence(c, distribution(), teacher)

    def state_dict(self):
        if not self.pool:
            return {}
        return {"anchors": [a for a, _ in self.pool], "soft": torch.stack([s for _, s in self.pool]).cpu()}

    def load_state_dict(self, state):
        self.pool = list(zip(state["anchors"], state["soft"])) if state else []


@contextlib.contextmanager
def membranes_set_to(membranes, tensors):
    """The membranes hold `tensors` inside the block, and their own weights again after it, even on an error."""
    own = membranes.state_dict()
    membranes.load_state_dict(tensors)
    try:
        yield
    finally:
        membranes.load_state_dict(own)


class MembraneAverage(Lever):
    """--ema D: checkpoints publish the bias-corrected exponential moving average of the membranes over the steps
    (Adam's correction: the average of the iterates with weights D^(t-i), whatever the start)."""
    name = "ema"

    def __init__(self, config):
        self.decay, self.average, self.count = config.ema, None, 0

    def updated(self, trainer):
        current = trainer.membranes.state_dict()
        if self.average is None:
            self.average = {k: torch.zeros_like(v) for k, v in current.items()}
        for k, v in current.items():
            self.average[k].mul_(self.decay).add_(v, alpha=1 - self.decay)
        self.count += 1
        return {}

    def published(self, trainer):
        if self.average is None:
            return contextlib.nullcontext()
        correction = 1 - self.decay ** self.count
        return membranes_set_to(trainer.membranes, {k: v / correction for k, v in self.average.items()})

    def state_dict(self):
        return {} if self.average is None else {"average": self.average, "count": self.count}

    def load_state_dict(self, state):
        self.average, self.count = state.get("average"), int(state.get("count", 0))


VALIDATION_DRAWS = 4  # batches of held-out prompts that --select-every scores


class CheckpointSelection(Lever):
    """--select-every K: every K steps and at the last, the step's objective without its adversaries (the erasure
    term plus each lever's own term, anchors above all) on VALIDATION_DRAWS batches of prompts drawn as training
    draws them but at step indices training never reaches, each row teacher-forced on the teacher's pictures of its
    prompt; checkpoints publish the membranes of the lowest score. Judge-free: no classifier, only the model."""
    name = "select"

    def __init__(self, config):
        self.every, self.held_out, self.best = config.select_every, None, None

    def updated(self, trainer):
        if trainer.step_count % self.every and trainer.step_count != trainer.config.steps:
            return {}
        if self.held_out is None:
            self.held_out = [held_out_batch(trainer, -1 - k) for k in range(VALIDATION_DRAWS)]
        with torch.no_grad():
            score = sum(validation_loss(trainer, *drawn) for drawn in self.held_out) / len(self.held_out)
        if distributed():  # every process scores its own rows; all of them choose by the mean
            torch.distributed.all_reduce(score)
            score /= torch.distributed.get_world_size()
        score = float(score)
        if self.best is None or score < self.best["score"]:
            self.best = {"score": score, "step": trainer.step_count, "membranes": trainer.membranes.state_dict()}
        return {"validation": score, "selected_step": self.best["step"]}

    def published(self, trainer):
        if self.best is None:
            return contextlib.nullcontext()
        return membranes_set_to(trainer.membranes, self.best["membranes"])

    def state_dict(self):
        return {} if self.best is None else {"best": self.best}

    def load_state_dict(self, state):
        self.best = state.get("best")


@torch.no_grad()
def held_out_batch(trainer, step):
    """(batch, codes, teacher) of held-out prompts: a Batch drawn as at `step`, each row group sampled by the
    teacher from its own prompts, and the teacher's distributions on them."""
    c, B = trainer.config, trainer.config.batch_size
    with trainer.drawing_at(step):
        batch = Batch(trainer, trainer.pick(c.concept, "concept"))
        names = list(batch.streams)
        index = torch.cat([torch.arange(*batch.rows[n][:2]) for n in names]).to(trainer.device)
        uniforms = torch.cat([rollout_uniforms(c.seed, step, trainer.first_index + batch.streams[n], B,
                                               trainer.num_tokens, trainer.device) for n in names])
        cfg = torch.full((len(index), 1), c.cfg, device=trainer.device)
        with trainer.membranes.disabled():
            codes = dict(zip(names, sample_codes(trainer.model, batch.cond[index], batch.uncond[index],
                                                 batch.mask[index], cfg, c.temperature, uniforms).split(B)))
            teacher = trainer.distributions(batch, codes, batch.groups + ["surrogate"])
    return batch, codes, teacher


def validation_loss(trainer, batch, codes, teacher):
    """The step's loss on a held-out batch, without adversaries: erasure divergence + sum of weight * the term of
    each lever that attacks nothing."""
    c = trainer.config
    student = trainer.distributions(batch, codes, batch.groups)
    step = Step(batch, codes, teacher, student, erasure_target(teacher["concept"], teacher["surrogate"], c.eta))
    loss = divergence(student["concept"], step.target, c.loss, c.kl_direction)
    for lever in trainer.levers:
        term = None if lever.adversarial else lever.loss(trainer, step)
        if term is not None:
            loss = loss + lever.weight * term
    return loss


class Avoidance(Lever):
    """--avoid: the erased prompts may not draw another concept more often than a model that met the erasure target
    would. Per row, one of the teacher's pictures of an avoided concept, teacher-forced under the row's concept
    prompt: relu(the student's mean log-likelihood per image token - the target's), both of what is sampled (CFG,
    temperature; the target's with the teacher's unconditional logits). Not the teacher's: any erasure lifts what the
    concept's guidance held down, the avoided concept with the rest. A KL towards the target barely weighs mass where
    the target has none; this term weighs exactly that mass."""
    name = "avoid"

    def __init__(self, config):
        self.concepts, self.references = config.avoid, {}

    def loss(self, trainer, step):
        c, batch = trainer.config, step.batch
        rows, surrogate = batch.rows["concept"], batch.rows["surrogate"]
        pictures = torch.cat([cached_pictures(self.references, trainer, a) for a in self.concepts])
        codes = pictures[row_picks(trainer, [len(pictures)] * (rows.stop - rows.start), "avoid")]
        cond, uncond, mask = (x[rows.start:rows.stop] for x in (batch.cond, batch.uncond, batch.mask))
        parts = [(cond, mask, codes), (uncond, mask, codes)] + ([] if surrogate.unconditional else [
            (batch.cond[surrogate.start:surrogate.stop], batch.mask[surrogate.start:surrogate.stop], codes)])
        with torch.no_grad(), trainer.membranes.disabled():
            concept, unconditional, *substitute = batched_image_logits(trainer.model, parts)
            substitute = substitute[0] if substitute else unconditional
            target = code_log_likelihood(erasure_target(concept, substitute, c.eta), unconditional, codes, c.cfg,
                                         c.temperature)
        student = cfg_log_likelihood(trainer.model, cond, uncond, mask, codes, c.cfg, c.temperature)
        return F.relu(student - target).mean()


def levers_for(config):
    """The plug-ins a Config switches on, in the order their rows enter the batch."""
    vocabulary = VocabularyAnchoring(config) if config.anchor_vocabulary else None
    soft_anchor_words = vocabulary if config.adversarial_anchors_from == "vocabulary" else None
    return ([Anchoring(config)] if config.anchor in ("prompts", "latent") else []) + \
        ([SoftPromptAdversary(config)] if config.adversarial == "soft" else []) + \
        ([LatentAdversary(config)] if config.latent_eps > 0 else []) + \
        ([vocabulary] if vocabulary else []) + \
        ([SoftAnchorAdversary(config, soft_anchor_words)] if config.adversarial_anchors else []) + \
        ([Avoidance(config)] if config.avoid else []) + \
        ([MembraneAverage(config)] if config.ema else []) + \
        ([CheckpointSelection(config)] if config.select_every else [])


class Trainer:
    """An erasure run on a resolved Config; first_index: the global index of this process' first sample."""

    def __init__(self, model, tokenizer, membranes, config, first_index=0, levers=None):
        if not isinstance(config, Config) or not config.is_resolved:
            raise SPMError("Trainer needs a resolved Config: pass config.resolved(model, tokenizer)", 2)
        self.model, self.tokenizer, self.membranes, self.config = model, tokenizer, membranes, config
        self.levers = levers_for(config) if levers is None else levers
        self.device, self.embed = next(model.parameters()).device, model.get_input_embeddings()
        self.num_tokens = model.config.vision_config.num_image_tokens
        self.context = model.config.text_config.max_position_embeddings - self.num_tokens
        self.first_index, self.step_count, self.cached_rollout, self.drawn_step = first_index, 0, None, None
        # context words of --augment; a style or an attribute gets none of its own kind (no 'red' into 'a blue car')
        own = set() if config.concept_type == "object" else \
            set(config.concept) | set(config.anchor_prompts or []) | set(PRESETS[config.concept_type].anchors)
        self.words = [w for w in vocabulary_words(tokenizer) if w not in own] if config.augment else []
        self.optimizer = torch.optim.AdamW(membranes.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        warmup, total = config.warmup, config.steps

        def schedule(step):  # linear warm-up, then cosine down to 10%
            if step < warmup:
                return (step + 1) / warmup
            return 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)

    def step(self):
        """One optimisation step; returns the metrics line."""
        c, started = self.config, time.time()
        batch = Batch(self, self.pick(c.concept, "concept"))    # the step's prompts, tokenised together
        codes = self.rollout(batch)                              # image tokens, sampled without gradients
        rollout_seconds = time.time() - started
        with torch.no_grad(), self.membranes.disabled():          # the teacher: the same model, membranes off
            teacher = self.distributions(batch, codes, batch.groups + ["surrogate"])
        target = self.erasure_target(batch, codes, teacher)
        student = self.distributions(batch, codes, batch.groups)  # one teacher-forced pass with gradients
        step = Step(batch, codes, teacher, student, target)
        erased = [(student["concept"], target)] + [pair for lever in self.levers
                                                   for pair in lever.adversaries(self, step)]
        terms = {"erase": sum(divergence(d, t, c.loss, c.kl_direction) for d, t in erased) / len(erased)}
        loss = terms["erase"]
        for lever in self.levers:
            term = lever.loss(self, step)
            if term is not None:
                terms[lever.name] = term
                loss = loss + lever.weight * term
        return self.update(loss, terms, rollout_seconds, started)

    def erasure_target(self, batch, codes, teacher):
        """What the concept rows are trained towards: t = l(surrogate) - eta * (l(concept) - l(surrogate)). A
        subclass may aim elsewhere (ablate.py's oracle target, a diagnostic)."""
        return erasure_target(teacher["concept"], teacher["surrogate"], self.config.eta)

    def pick(self, concepts, purpose):
        """batch_size (concept, template) pairs; with --augment, a share of the templates get random edits."""
        picks = []
        for index in range(self.first_index, self.first_index + self.config.batch_size):
            generator = self.generator(index, purpose)
            concept = concepts[int(torch.randint(len(concepts), (), generator=generator))]
            template = self.config.templates[int(torch.randint(len(self.config.templates), (), generator=generator))]
            if torch.rand((), generator=generator) < self.config.augment:
                template = augment_template(template, self.words, generator)
            picks.append((concept, template))
        return picks

    @property
    def rollout_step(self):
        """The step whose prompts and rollout this step uses (--rollout-every K reuses one for K steps)."""
        if self.drawn_step is not None:
            return self.drawn_step
        return self.step_count - self.step_count % self.config.rollout_every

    @contextlib.contextmanager
    def drawing_at(self, step):
        """Prompts and noise drawn as at another step: held-out ones at negative steps, which training never draws."""
        self.drawn_step = step
        try:
            yield
        finally:
            self.drawn_step = None

    @contextlib.contextmanager
    def published(self):
        """A context in which the membranes hold what a checkpoint saves (--ema's average, --select-every's best)."""
        with contextlib.ExitStack() as stack:
            for lever in self.levers:
                stack.enter_context(lever.published(self))
            yield

    def generator(self, index, purpose):
        """Each sample's randomness comes from (seed, step, global sample index): a sample does not depend on the
        batch or the process it lands in, and a resumed run repeats it exactly."""
        return torch.Generator().manual_seed(derived_seed(self.config.seed, self.rollout_step, index, purpose))

    def rollout(self, batch):
        """Codes of every sampled row group, drawn in one batch without gradients: name -> [B, N]."""
        if self.cached_rollout is None or self.cached_rollout[0] != self.rollout_step:
            c, B, names = self.config, self.config.batch_size, list(batch.streams)
            source = {"concept": batch.rows["surrogate"]} if c.rollout == "surrogate" else {}  # rows that draw
            index = torch.cat([torch.arange(*source.get(n, batch.rows[n])[:2]) for n in names]).to(self.device)
            uniforms = torch.cat([rollout_uniforms(c.seed, self.rollout_step, self.first_index + batch.streams[n], B,
                                                   self.num_tokens, self.device) for n in names])
            cfg = torch.full((len(index), 1), c.cfg, device=self.device)
            if c.rollout == "target":  # the concept rows from the target itself: the teacher at CFG -cfg * eta
                cfg[:B] = -c.cfg * c.eta
            cond = batch.cond[index]
            if source.get("concept", Rows(0, 0)).unconditional:  # the empty surrogate: the unconditional prompt
                cond[:B] = batch.uncond[:B]
            with self.membranes.switched(c.rollout in ("student", "surrogate")):
                codes = sample_codes(self.model, cond, batch.uncond[index], batch.mask[index], cfg, c.temperature,
                                     uniforms).split(B)
            self.cached_rollout = (self.rollout_step, dict(zip(names, codes)))
        return self.cached_rollout[1]

    def distributions(self, batch, codes, groups):
        """What the loss compares, for each row group, from ONE teacher-forced pass over all of them."""
        twins = (False, True) if self.config.loss_on == "cfg" else (False,)
        views = list(dict.fromkeys(batch.view(g, u) for g in groups for u in twins))
        parts = [((batch.uncond if v.unconditional else batch.cond)[v.start:v.stop], batch.mask[v.start:v.stop],
                  codes[v.codes]) for v in views]
        logits = dict(zip(views, batched_image_logits(self.model, parts, self.config.loss == "hidden")))
        return {g: self.distribution(logits[batch.view(g)], logits.get(batch.view(g, True))) for g in groups}

    def distribution(self, cond_logits, uncond_logits=None):
        """The raw conditional logits (--loss-on cond), or the CFG-combined, tempered ones that are sampled (cfg)."""
        c = self.config
        if c.loss_on == "cond":
            return cond_logits
        combined = cfg_combine(cond_logits, uncond_logits, c.cfg)
        return combined / c.temperature if c.temperature > 0 else combined

    def update(self, loss, terms, rollout_seconds, started):
        """Backward, the mean over processes, clip, step; a non-finite step is skipped whole, schedule included."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = self.membranes.parameters()
        logged = torch.stack([loss.detach()] + [t.detach() for t in terms.values()])
        if distributed():  # the gradients and the metrics line are the means over all processes
            world = torch.distributed.get_world_size()
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                torch.distributed.all_reduce(p.grad)
                p.grad /= world
            torch.distributed.all_reduce(logged)
            logged /= world
        has_grads = any(p.grad is not None for p in params)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, self.config.grad_clip or float("inf"))
        finite = bool(torch.isfinite(loss)) and bool(torch.isfinite(grad_norm)) and has_grads
        if finite:
            self.optimizer.step()
            self.scheduler.step()
        self.step_count += 1
        updates = {k: v for lever in self.levers for k, v in lever.updated(self).items()}
        return {"step": self.step_count, **dict(zip(["loss", *terms], logged.tolist())),
                "grad_norm": grad_norm.item(), "lr": self.scheduler.get_last_lr()[0], "finite": finite, **updates,
                "rollout_s": round(rollout_seconds, 4), "step_s": round(time.time() - started, 4)}

    def state_dict(self):
        return {"membranes": self.membranes.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "step": self.step_count,
                "levers": {lever.name: lever.state_dict() for lever in self.levers}}

    def load_state_dict(self, state):
        self.membranes.load_state_dict(state["membranes"], source=STATE_NAME)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step_count = int(state["step"])  # no global RNG state: every draw comes from a seeded generator
        for lever in self.levers:
            lever.load_state_dict(state.get("levers", {}).get(lever.name, {}))


def distributed():
    """True inside a torchrun process group."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


# -----------------------------------------------------------------------------
# Files: pictures, checkpoints (the membranes alone, as safetensors, with the run's Config in the metadata)


@torch.no_grad()
def decode_images(model, codes):
    """Codes [B, N] -> uint8 pixels [B, H, W, 3]."""
    pixels = model.decode_image_tokens(codes).float()
    return ((pixels.clamp(-1, 1) + 1) / 2 * 255).round().to(torch.uint8).cpu()


def image_grid(rows, row_labels, column_labels=None, cell=128, label_width=170):
    """rows: list of uint8 [K, H, W, 3] tensors -> one labelled PIL image, one row per entry."""
    from PIL import Image, ImageDraw

    header, columns = 14 if column_labels else 0, max(len(r) for r in rows)
    grid = Image.new("RGB", (label_width + columns * (cell + 2), header + len(rows) * (cell + 2)), "white")
    draw = ImageDraw.Draw(grid)
    for c, text in enumerate(column_labels or []):
        draw.text((label_width + c * (cell + 2) + 2, 1), str(text)[:cell // 6], fill="black")  # ~6 px a character
    for r, (images, label) in enumerate(zip(rows, row_labels)):
        y = header + r * (cell + 2)
        draw.text((4, y + cell // 2 - 6), str(label)[:label_width // 6], fill="black")
        for c, image in enumerate(images):
            picture = Image.fromarray(image.numpy()).resize((cell, cell), Image.NEAREST)
            grid.paste(picture, (label_width + c * (cell + 2), y))
    return grid


def write_sample_grid(path, model, tokenizer, prompts, seeds, cfg, temperature, title=""):
    """A PNG of every prompt at every seed; returns the codes [P, S, N]."""
    codes = sample_prompts(model, tokenizer, prompts, seeds, cfg, temperature)
    grid = image_grid([decode_images(model, c) for c in codes], prompts, [f"{title} seed {s}" for s in seeds])
    save_atomic(path, lambda tmp: grid.save(tmp, format="PNG"))
    return codes


def save_atomic(path, write):
    """write(tmp_path), fsync, then rename over path: a crash never leaves a half-written file at path."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(str(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    with contextlib.suppress(OSError):  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)


def model_signature(model):
    """The base model's shape, stored with the membranes so that a checkpoint for another model is refused."""
    text, vq = model.config.text_config, model.config.vq_config
    return {"hidden_size": text.hidden_size, "num_hidden_layers": text.num_hidden_layers,
            "vocab_size": text.vocab_size, "codebook_size": vq.num_embeddings,
            "num_image_tokens": model.config.vision_config.num_image_tokens}


def save_membranes(path, membranes, config, step, world_size=1):
    from safetensors.torch import save_file

    metadata = {"format": "spm-janus", "config": json.dumps(config.to_dict()), "model": str(config.model),
                "model_signature": json.dumps(model_signature(membranes.model)),
                "modules": json.dumps(membranes.names), "rank": str(membranes.rank), "alpha": str(membranes.alpha),
                "scope": membranes.scope, "concepts": json.dumps(config.concept), "step": str(step),
                "world_size": str(world_size)}
    tensors = membranes.state_dict()
    save_atomic(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def checkpoint_path(path):
    """A run directory or its membranes file -> the membranes file."""
    path = Path(path)
    if path.is_dir() and not (path / CHECKPOINT_NAME).is_file():
        raise SPMError(f"--ckpt {path} is a directory without {CHECKPOINT_NAME}: pass a run directory (the --out of "
                       f"spm_janus.py) or its {CHECKPOINT_NAME}", 2)
    if not path.exists():
        raise SPMError(f"--ckpt {path} does not exist: pass a run directory or its {CHECKPOINT_NAME}", 2)
    return membranes_file(path)


def membranes_file(path):
    """A run directory's membranes file, or the path itself where it names a file; checks nothing."""
    path = Path(path)
    return path / CHECKPOINT_NAME if path.is_dir() else path


def read_checkpoint(path):
    """(tensors, metadata with the config parsed) of a run directory or membranes file; one-line errors."""
    from safetensors import safe_open

    path = checkpoint_path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata, tensors = dict(f.metadata() or {}), {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise SPMError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0][:120]}); "
                       f"it may be truncated or corrupt", 1) from None
    try:
        for key in ("config", "modules", "model_signature"):
            metadata[key] = json.loads(metadata[key])
        metadata["rank"] == "full" or int(metadata["rank"]), float(metadata["alpha"]), int(metadata["step"])
        assert metadata["scope"] in SCOPES and isinstance(metadata["config"], dict)
    except (KeyError, ValueError, TypeError, AssertionError):
        raise SPMError(f"{path}: missing or invalid spm-janus metadata: not a membranes file of spm_janus.py", 2) from None
    return tensors, metadata


def load_membranes(path, model, tokenizer):
    """The membranes of a checkpoint, rebuilt on `model` with their weights: (membranes, metadata)."""
    tensors, metadata = read_checkpoint(path)
    signature = model_signature(model)
    for key, value in metadata["model_signature"].items():
        if signature.get(key) != value:
            raise SPMError(f"{path}: made for another model ({metadata['model']}, {key} {value}); this model has "
                           f"{key} {signature.get(key)}: pass the checkpoint's base model as --model", 2)
    rank = metadata["rank"] if metadata["rank"] == "full" else int(metadata["rank"])
    membranes = Membranes(model, metadata["modules"], rank, float(metadata["alpha"]),
                          metadata["scope"], image_token_ids(tokenizer))
    try:
        membranes.load_state_dict(tensors, source=str(path))
    except SPMError:
        membranes.detach()
        raise
    return membranes, metadata


def on_top_files(config):
    """--on-top's membranes files, checked before anything is written."""
    files = []
    for path in config.on_top:
        if Path(path).resolve() == Path(config.out).resolve():
            raise SPMError(f"--on-top {path} is this run's own --out: give the run directory of another erasure", 2)
        file = membranes_file(path)
        if not file.is_file():
            raise SPMError(f"--on-top {path}: no {CHECKPOINT_NAME} there; give the run directory of an earlier "
                           f"erasure of this model", 2)
        scope = read_checkpoint(file)[1]["scope"]
        if scope != config.scope:
            raise SPMError(f"--on-top {path}: its membranes have scope {scope}, this run's {config.scope}; membranes "
                           f"loaded together share the scope: pass --scope {scope}", 2)
        files.append(file)
    return files


def load_beneath(model, tokenizer, config):
    """--on-top: the membranes of those runs on `model`, frozen and on; attach the run's own after them, so that
    switching its own off leaves the model with these (the teacher). Returns them."""
    beneath = []
    for file in on_top_files(config):
        membranes, _ = load_membranes(file, model, tokenizer)
        for p in membranes.parameters():
            p.requires_grad_(False)
        beneath.append(membranes)
    return beneath


def save_run(out, trainer, world_size=1):
    """The trainer state first, then the membranes: each file is atomic, and the state holds its own copy of the
    membranes, so a kill between the two leaves a consistent pair to resume from."""
    state = trainer.state_dict()
    save_atomic(out / STATE_NAME, lambda tmp: torch.save(state, tmp))
    with trainer.published():
        save_membranes(out / CHECKPOINT_NAME, trainer.membranes, trainer.config, trainer.step_count, world_size)


def load_trainer_state(path):
    try:
        return torch.load(path, weights_only=True)  # never unpickle code from a checkpoint
    except Exception as e:
        raise SPMError(f"{path}: cannot be read ({str(e).splitlines()[0][:100]}); it may be truncated or corrupt", 1) from None


# -----------------------------------------------------------------------------
# Command line


class OneLineParser(argparse.ArgumentParser):
    """argparse with one-line usage errors that name the problem, no prefix matching of flags (a typo such as
    --step must not silently become --steps), and each default said once in the help."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{"allow_abbrev": False, "formatter_class": DefaultsOnce, **kwargs})

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class DefaultsOnce(argparse.HelpFormatter):
    """'(default: X)' after a flag's help, unless the help says its default already or there is none to say."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: {action.default})"


def build_parser():
    """One flag per Config field, grouped as in the Config; flags not given stay out of the Namespace, so that
    --resume tells what was given."""
    parser = OneLineParser(prog="spm_janus.py", usage="%(prog)s --concept CONCEPT [options]\n"
                           "       %(prog)s export-peft --ckpt RUN --out DIR",
                           description="Erase a visual concept from Janus-Pro with SPM membranes; "
                                       "`spm_janus.py export-peft --help` writes scope-all membranes as a PEFT adapter.")
    groups = {}
    for f in dataclasses.fields(Config):
        meta = f.metadata
        group = groups.get(meta["group"]) or groups.setdefault(meta["group"], parser.add_argument_group(meta["group"]))
        shown = "" if f.default is None or "default" in meta["help"] else f" (default: {f.default!r})" \
            if isinstance(f.default, str) else f" (default: {f.default})"
        group.add_argument("--" + f.name.replace("_", "-"), default=argparse.SUPPRESS,
                           help=(meta["help"] + shown).replace("%", "%%"),
                           type=meta["type"] or type(f.default), choices=meta["choices"],
                           action="append" if meta["many"] else "store")
    groups["output"].add_argument("--resume", default=None, help="run directory to continue from its last checkpoint, "
                                  "with its own settings; only the flags of the budget and the output may change")
    groups["output"].add_argument("--overwrite", action="store_true", help="allow --out to hold a different run")
    return parser


def config_from_args(args):
    """The Config of the flags given; with --resume, the run's own Config with them, refused if one changes the
    method (only the budget and the output may change)."""
    given = {k: v for k, v in vars(args).items() if k not in ("resume", "overwrite")}
    if "templates" in given:  # a value without {} that names a file: one template a line
        given["templates"] = [t.strip() for value in given["templates"] for t in (
            Path(value).read_text().splitlines() if "{}" not in value and Path(value).is_file() else [value])
            if t.strip()]
    if not args.resume:
        return Config(**given)
    run = Path(args.resume)
    if not (run / CHECKPOINT_NAME).is_file():
        raise SPMError(f"--resume {run}: no {CHECKPOINT_NAME} there; pass the --out directory of an earlier run", 2)
    previous = Config.from_dict(read_checkpoint(run / CHECKPOINT_NAME)[1]["config"])
    given.pop("out", None)  # the run directory is the one resumed
    wanted = dataclasses.replace(previous, **given, out=args.resume)
    for f in dataclasses.fields(Config):
        if not f.metadata["resumable"] and f.name != "out" and getattr(wanted, f.name) != getattr(previous, f.name):
            raise SPMError(f"--resume {run}: --{f.name.replace('_', '-')} was {getattr(previous, f.name)!r} in that "
                           f"run, now {getattr(wanted, f.name)!r}; resume with the run's method flags (only --steps "
                           f"and the output flags may change)", 2)
    return wanted


def prepare_out_dir(out, resume=False, overwrite=False):
    """The run directory; one that holds a different run is refused unless resuming or overwriting."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise SPMError(f"--out {out} cannot be written ({e.strerror or e}): choose another directory", 2) from None
    if (out / CHECKPOINT_NAME).exists() and not resume and not overwrite:
        raise SPMError(f"--out {out} already holds a run: pass --resume {out} to continue it, --overwrite to "
                       f"replace it, or another --out", 2)
    return out


def setup_distributed(device):
    """torchrun sets WORLD_SIZE, RANK and LOCAL_RANK: join the group (NCCL on GPUs, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    return torch.distributed.get_rank(), world, device


@contextlib.contextmanager
def stop_signals():
    """SIGINT and SIGTERM ask the loop to stop after the step, save and exit non-zero; a second SIGINT stops at once."""
    received = []

    def handle(signum, frame):
        if received:
            raise KeyboardInterrupt
        received.append(signum)

    previous = {s: signal.signal(s, handle) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


GRID_SEEDS = [0, 1, 2, 3]


class ErasureSignal:
    """What the training log says of the erasure at each sample grid: the mean log-likelihood per image token, under
    the student, of the teacher's own pictures of the concept's example prompt ('a mouse'; grid seeds; it falls as
    the erasure takes), and on the toy, whose judge toy_janus.py beside this file has, the share of the grid's
    pictures of it still judged the concept."""

    def __init__(self, model, tokenizer, membranes, config):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.prompts = [config.example(c) for c in config.concept]
        with membranes.disabled():
            self.references = sample_prompts(model, tokenizer, self.prompts, GRID_SEEDS, config.cfg,
                                             config.temperature)
        self.judge, self.first = None, None
        if getattr(model.config, "toy_world", None) is not None or \
                Path(resolve_model(config.model)).resolve() == toy_model_dir().resolve():
            with contextlib.suppress(ImportError):
                import toy_janus  # its judge names (object, colour, style)
                part = {"object": 0, "attribute": 1, "style": 2}.get(config.concept_type)
                if part is not None:
                    self.judge = lambda codes: [verdict[part] for verdict in toy_janus.judge_batch(codes)]

    def __call__(self, grid):
        """Figures of the student now; grid: prompt -> codes [S, N] of the grid just drawn."""
        c = self.config
        figures = {"concept_ll": prompt_log_likelihood(self.model, self.tokenizer, self.prompts, self.references,
                                                       c.cfg, c.temperature).mean().item()}
        if self.judge is not None:
            drawn = [grid[p] if p in grid else sample_prompts(self.model, self.tokenizer, [p], GRID_SEEDS, c.cfg,
                                                               c.temperature)[0] for p in self.prompts]
            judged = [label == concept for concept, codes in zip(c.concept, drawn) for label in self.judge(codes)]
            figures["concept_share"] = sum(judged) / len(judged)
        self.first = self.first or figures
        return figures

    def describe(self, figures):
        names, first = "/".join(self.config.concept), figures is self.first
        text = f"the teacher's {names} pictures have log-likelihood {figures['concept_ll']:.3f} per token" + \
            ("" if first else f" (first grid: {self.first['concept_ll']:.3f})")
        if "concept_share" in figures:
            text += f"; {figures['concept_share']:.0%} of the grid's {names} pictures are judged {names}" + \
                ("" if first else f" (first grid: {self.first['concept_share']:.0%})")
        return text


def train(config, resume=False, overwrite=False):
    """Train the membranes of a Config into config.out; returns the resolved Config."""
    device = pick_device(config.device)
    model_config = load_config(config.model)  # a missing model leaves no empty run directory behind
    on_top_files(config)
    out = prepare_out_dir(config.out, resume, overwrite)
    set_threads(config.threads, model_config, device)
    membrane_targets(model_config.text_config.num_hidden_layers, config.layers, config.modules,
                     config.attn_layer_ids, config.mlp_layer_ids)  # bad layer ids fail here, before any weights load
    rank, world, device = setup_distributed(device)
    model, tokenizer = load_model(config.model, config.dtype, device)
    config = config.resolved(model, tokenizer)
    load_beneath(model, tokenizer, config)
    membranes = attach_for(model, tokenizer, config)
    trainer = Trainer(model, tokenizer, membranes, config, first_index=rank * config.batch_size)
    if resume:
        trainer.load_state_dict(load_trainer_state(out / STATE_NAME))
    writes = rank == 0  # only rank 0 writes checkpoints, grids and metrics
    signal = ErasureSignal(model, tokenizer, membranes, config) if writes and config.sample_every else None

    def write_grid():
        """The sample grid of this step, and what it says of the erasure: {} when no grid is due."""
        if signal is None:
            return {}
        path = out / "samples" / f"step_{trainer.step_count:06d}.png"
        path.parent.mkdir(exist_ok=True)
        with trainer.published():  # a grid shows what a checkpoint of this step holds
            codes = write_sample_grid(path, model, tokenizer, config.sample_prompts, GRID_SEEDS, config.cfg,
                                      config.temperature, f"step {trainer.step_count}")
            figures = signal(dict(zip(config.sample_prompts, codes)))
        tqdm.write(f"step {trainer.step_count}: {signal.describe(figures)}; grid {path}", file=sys.stderr)
        return figures

    if writes:
        share = 100 * membranes.num_parameters() / sum(p.numel() for p in model.parameters())
        print(f"{len(membranes.names)} membranes, {membranes.num_parameters()} parameters ({share:.4f}% of the "
              f"model), scope {config.scope}, cfg {config.cfg}, temperature {config.temperature}, "
              f"batch {config.batch_size} x {world} process(es), out {out}")
    from tqdm import tqdm

    if trainer.step_count == 0:
        write_grid()
    progress = tqdm(range(trainer.step_count, config.steps), initial=trainer.step_count, total=config.steps,
                    disable=not writes, dynamic_ncols=True)
    bad_steps, shown = 0, ["loss", "erase", *[lever.name for lever in trainer.levers]]
    with stop_signals() as stop, (open(out / "metrics.jsonl", "a") if writes else contextlib.nullcontext()) as log:
        for _ in progress:
            metrics = trainer.step()
            bad_steps = 0 if metrics["finite"] else bad_steps + 1
            if not metrics["finite"]:
                tqdm.write(f"warning: step {trainer.step_count}: non-finite loss or gradient, step skipped",
                           file=sys.stderr)
                if bad_steps >= config.max_bad_steps:
                    raise SPMError(f"{bad_steps} steps in a row had a non-finite loss or gradient; stopped. The last "
                                   f"good checkpoint is kept in {out}: lower --lr or use --dtype float32", 1)
            step = trainer.step_count
            if config.sample_every and (step % config.sample_every == 0 or step == config.steps):
                metrics.update(write_grid())
            progress.set_postfix({k: f"{metrics[k]:.4f}" for k in shown if k in metrics})
            if writes:
                log.write(json.dumps(metrics) + "\n")
                log.flush()
            if stop:
                if writes:
                    save_run(out, trainer, world)
                    print(f"\ninterrupted: saved {out / CHECKPOINT_NAME} at step {step}; continue with "
                          f"--resume {out}", file=sys.stderr)
                sys.exit(128 + stop[0])
            if writes and config.save_every and step % config.save_every == 0 and step < config.steps:
                save_run(out, trainer, world)
    if writes:
        save_run(out, trainer, world)
        selection = next((lever for lever in trainer.levers if isinstance(lever, CheckpointSelection)), None)
        chosen = f" (the membranes of step {selection.best['step']}, the lowest --select-every score " \
                 f"{selection.best['score']:.4f})" if selection and selection.best else ""
        print(f"saved {out / CHECKPOINT_NAME} at step {trainer.step_count}{chosen}")
    return config


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["export-peft"]:  # the PEFT export lives in inference.py, beside this file
            try:
                import inference
            except ImportError:
                raise SPMError("export-peft needs inference.py of spm-janus next to spm_janus.py", 1) from None
            return inference.export_main(argv[1:])
        args = build_parser().parse_args(argv)
        train(config_from_args(args), resume=bool(args.resume), overwrite=args.overwrite)
    except SPMError as e:
        print(f"spm_janus.py: error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    finally:
        if distributed():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
