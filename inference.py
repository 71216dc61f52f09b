"""
Inference with trained membranes, on spm_janus.py's public API: facilitated transport, several membrane sets on one
model, understanding drift (membranes on vs off), and the PEFT export.

    import inference
    loaded = inference.load_all_membranes(["runs/mouse", "runs/cat"], model, tokenizer)
    inference.transport_strength(model, tokenizer, "a red mouse", ["mouse"])     # 1.0
    inference.export_peft("runs/all", "runs/all/peft")                            # scope-all membranes only
"""
import contextlib
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import spm_janus as spm


# -----------------------------------------------------------------------------
# Facilitated transport: each membrane acts on a prompt with a strength from how much the prompt is about it


def prompt_concept_match(model, tokenizer, prompt, concept):
    """How much a prompt is about a concept, in [0, 1]: the larger of
    - the cosine between the mean-pooled input embeddings of prompt and concept. Input embeddings, not hidden
      states: the embedding table is frozen and never behind a membrane, so the score is the same with membranes
      on or off, costs no forward pass, and does not depend on the chat template around the prompt;
    - the share of the concept's tokens found in the prompt (all of them when the prompt spells the concept)."""
    embed = model.get_input_embeddings()
    prompt_ids = tokenizer(f" {prompt}", add_special_tokens=False).input_ids
    columns = spm.concept_columns(tokenizer, f" {prompt}", concept)
    concept_ids = [prompt_ids[i] for i in columns] if columns else \
        tokenizer(f" {concept}", add_special_tokens=False).input_ids
    device = embed.weight.device
    with torch.no_grad():
        prompt_vector = embed(torch.tensor(prompt_ids, device=device)).float().mean(0)
        concept_vector = embed(torch.tensor(concept_ids, device=device)).float().mean(0)
        cosine = F.cosine_similarity(prompt_vector, concept_vector, 0).item()
    share = sum(token in prompt_ids for token in concept_ids) / max(1, len(concept_ids))
    return max(cosine, share)


def transport_strength(model, tokenizer, prompt, concepts, factor=1.0):
    """SPM's facilitated transport: a membrane acts on a prompt with strength min(1, factor * match)."""
    return min(1.0, factor * max(prompt_concept_match(model, tokenizer, prompt, c) for c in concepts))


# -----------------------------------------------------------------------------
# Several membrane sets on one model


class MembraneGroup:
    """Several loaded membrane sets switched together, with the on/off interface of one."""

    def __init__(self, sets):
        self.sets = sets

    @contextlib.contextmanager
    def switched(self, enabled, strengths=None):
        """strengths: one multiplier per set for the duration (facilitated transport), or None to keep theirs."""
        with contextlib.ExitStack() as stack:
            for i, membranes in enumerate(self.sets):
                stack.enter_context(membranes.switched(enabled))
                if strengths is not None:
                    stack.enter_context(membranes.strength(strengths[i]))
            yield self

    def disabled(self):
        return self.switched(False)

    def enabled(self):
        return self.switched(True)


def load_all_membranes(paths, model, tokenizer):
    """Membranes of several runs on one base model: their deltas add, each keeps its own strength."""
    loaded = []
    for path in paths:
        membranes, metadata = spm.load_membranes(path, model, tokenizer)
        if loaded and membranes.scope != loaded[0][0].scope:
            raise spm.SPMError(f"--ckpt {path}: scope {membranes.scope} differs from --ckpt {paths[0]}'s scope "
                               f"{loaded[0][0].scope}; membranes loaded together must share the scope", 2)
        loaded.append((membranes, metadata))
    given = {spm.checkpoint_path(p).resolve() for p in paths}
    for path, (_, metadata) in zip(paths, loaded):
        for beneath in metadata["config"].get("on_top") or []:
            if spm.membranes_file(beneath).resolve() not in given:
                print(f"note: {path} was trained on top of {beneath}'s membranes: load both (--ckpt {beneath} --ckpt "
                      f"{path}) for what it was trained to draw", file=sys.stderr)
    return loaded


# -----------------------------------------------------------------------------
# Understanding: the next-token distributions of image+question and text-only inputs, membranes off vs on


def understanding_inputs(tokenizer, model, questions, pixel_values=None):
    """Janus understanding prompts: '<|User|>: [<begin_of_image> image <end_of_image>]\n{question}\n\n<|Assistant|>:'."""
    image = ""
    if pixel_values is not None:
        count = model.config.vision_config.num_image_tokens
        image = f"{tokenizer.boi_token}{tokenizer.image_token * count}{tokenizer.eoi_token}\n"
    # Left-padded, so that the last column is every row's next token (pass position_ids=spm.positions(mask) too).
    batch = tokenizer([f"<|User|>: {image}{q}\n\n<|Assistant|>:" for q in questions], return_tensors="pt",
                      padding=True, padding_side="left")
    device = next(model.parameters()).device
    return batch.input_ids.to(device), batch.attention_mask.to(device)


def pixels_for_understanding(model, images):
    """uint8 [B, H, W, 3] pictures -> pixel_values [B, 3, S, S] in [-1, 1] at the vision tower's size."""
    size = model.config.vision_config.image_size
    pixels = images.permute(0, 3, 1, 2).float() / 127.5 - 1
    pixels = F.interpolate(pixels, size=(size, size), mode="bilinear", align_corners=False)
    return pixels.to(next(model.parameters()))


@torch.no_grad()
def understanding_drift(model, tokenizer, membranes, questions, images=None):
    """Next-token distributions of understanding inputs, membranes off vs on: mean KL(off || on), the share of
    rows whose top-1 token agrees, and the largest absolute logit difference."""
    pixel_values = None if images is None else pixels_for_understanding(model, images)
    input_ids, mask = understanding_inputs(tokenizer, model, questions, pixel_values)

    def next_token_logits():
        out = model(input_ids=input_ids, attention_mask=mask, position_ids=spm.positions(mask),
                    pixel_values=pixel_values, logits_to_keep=1)
        return out.logits[:, -1].float()

    with membranes.disabled():
        base = next_token_logits()
    with membranes.enabled():
        erased = next_token_logits()
    kl = (F.softmax(base, -1) * (F.log_softmax(base, -1) - F.log_softmax(erased, -1))).sum(-1)
    return {"kl": kl.mean().item(), "top1_agreement": (base.argmax(-1) == erased.argmax(-1)).float().mean().item(),
            "max_abs_logit_diff": (base - erased).abs().max().item()}


# -----------------------------------------------------------------------------
# PEFT


def export_peft(ckpt, out_dir):
    """Write scope-all membranes as a PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors):
    down is lora_A [rank, in], up is lora_B [out, rank], and PEFT's scaling lora_alpha / r is ours."""
    from safetensors.torch import save_file

    tensors, metadata = spm.read_checkpoint(ckpt)
    if metadata["scope"] != "all":
        raise spm.SPMError(f"{ckpt}: scope {metadata['scope']} cannot be a PEFT LoRA adapter, which acts on every "
                       f"position: only membranes trained with --scope all can be exported", 2)
    if metadata["rank"] == "full":
        raise spm.SPMError(f"{ckpt}: rank full has one rank per module, a PEFT LoRA adapter one for all: export a run "
                           f"of a whole-number --rank", 2)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lora = {}
    for name in metadata["modules"]:
        lora[f"base_model.model.{name}.lora_A.weight"] = tensors[f"{name}.down"]
        lora[f"base_model.model.{name}.lora_B.weight"] = tensors[f"{name}.up"]
    config = {"peft_type": "LORA", "task_type": None, "base_model_name_or_path": metadata["model"],
              "r": int(metadata["rank"]), "lora_alpha": float(metadata["alpha"]), "lora_dropout": 0.0,
              "target_modules": metadata["modules"], "bias": "none", "fan_in_fan_out": False,
              "use_rslora": False, "use_dora": False, "init_lora_weights": True, "modules_to_save": None}
    spm.save_atomic(out_dir / "adapter_model.safetensors", lambda tmp: save_file(lora, tmp))
    spm.save_atomic(out_dir / "adapter_config.json", lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2)))
    return out_dir


def export_main(argv):
    """`spm_janus.py export-peft --ckpt RUN --out DIR`."""
    parser = spm.OneLineParser(prog="spm_janus.py export-peft",
                               description="Write membranes of scope all as a PEFT LoRA adapter.")
    parser.add_argument("--ckpt", required=True, help="run directory (or its membranes.safetensors), trained with "
                                                      "--scope all")
    parser.add_argument("--out", required=True, help="directory for adapter_config.json and adapter_model.safetensors")
    args = parser.parse_args(argv)
    print(f"wrote {export_peft(args.ckpt, args.out)}")
