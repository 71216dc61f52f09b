"""
Sample images from Janus-Pro with erased concepts, or without any membranes.

    python sample.py --ckpt runs/mouse/membranes.safetensors --prompt "a photo of a mouse" --compare
    python sample.py --model tiny --prompt "a cat"

Everything about the membranes (model, modules, rank, scope, ...) is read from the checkpoint's metadata.
"""
import argparse
import sys
from pathlib import Path

import torch

import spm_janus as spm


def build_parser():
    parser = spm.OneLineParser(prog="sample.py", description="Sample Janus-Pro images with and without SPM membranes.",
                               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = parser.add_argument_group("model")
    g.add_argument("--ckpt", default=None, help="membranes.safetensors of a run (omit for plain Janus sampling)")
    g.add_argument("--model", default=None, help="base model; overrides the checkpoint's (required without --ckpt)")
    g.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="base weight dtype (default: the run's)")
    g.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cuda, mps or cpu")
    g.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = auto: 1 for models narrower than 512, else torch's default)")

    g = parser.add_argument_group("sampling")
    g.add_argument("--prompt", action="append", default=None,
                   help="prompt; repeatable (default: the run's concepts and sample prompts)")
    g.add_argument("--n", type=int, default=4, help="samples per prompt")
    g.add_argument("--seed", type=int, default=0, help="first seed; sample k of a prompt uses seed + k")
    g.add_argument("--cfg", type=float, default=None, help="CFG scale (default: the model's generation config)")
    g.add_argument("--temperature", type=float, default=None, help="temperature (default: the model's)")
    g.add_argument("--strength", type=float, default=1.0, help="membrane multiplier (0 = base model)")

    g = parser.add_argument_group("output")
    g.add_argument("--compare", action="store_true", help="grid with base and erased columns for the same seeds")
    g.add_argument("--out", default="samples", help="output PNG file, or a directory for samples.png / compare.png")
    return parser


def output_path(out, compare):
    out = Path(out)
    if out.suffix.lower() == ".png":
        out.parent.mkdir(parents=True, exist_ok=True)
        return out
    out.mkdir(parents=True, exist_ok=True)
    return out / ("compare.png" if compare else "samples.png")


def run(args):
    if args.n < 1:
        raise spm.SPMError(f"--n {args.n} must be at least 1", 2)
    config, metadata = {}, None
    if args.ckpt:
        _, metadata = spm.read_checkpoint(args.ckpt)  # one-line errors for missing or corrupt files
        config = metadata["config"]
    elif args.compare:
        raise spm.SPMError("--compare needs --ckpt: there is nothing to compare the base model with", 2)
    model_name = args.model or config.get("model")
    if not model_name:
        raise spm.SPMError("no model: pass --ckpt of a run, or --model (a hub id, a local directory, or tiny)", 2)
    device = spm.pick_device(args.device)
    spm.set_threads(args.threads, spm.load_config(model_name), device)
    model, tokenizer = spm.load_model(model_name, args.dtype or config.get("dtype", "float32"), device)
    membranes = spm.load_membranes(args.ckpt, model, tokenizer)[0] if args.ckpt else None
    cfg, temperature = spm.generation_defaults(model)
    cfg = args.cfg if args.cfg is not None else cfg
    temperature = args.temperature if args.temperature is not None else temperature
    prompts = args.prompt or [f"a {c}" for c in config.get("concept", [])] + \
        [f"a {c}" for c in (config.get("anchor_prompts") or [])[:3]] or ["a photo of a cat"]
    seeds = list(range(args.seed, args.seed + args.n))

    def draw(enabled):
        if membranes is None:
            return spm.sample_prompts(model, tokenizer, prompts, seeds, cfg, temperature)
        with membranes.switched(enabled), membranes.strength(args.strength):
            return spm.sample_prompts(model, tokenizer, prompts, seeds, cfg, temperature)

    erased = draw(True)  # [P, n, N]
    rows = [spm.decode_images(model, codes) for codes in erased]
    columns = [f"{'erased' if membranes else 'seed'} {s}" for s in seeds]
    if args.compare:
        base = draw(False)
        rows = [torch.cat([spm.decode_images(model, b), r]) for b, r in zip(base, rows)]
        columns = [f"base {s}" for s in seeds] + columns
    path = output_path(args.out, args.compare)
    grid = spm.image_grid(rows, prompts, columns)
    spm.save_atomic(path, lambda tmp: grid.save(tmp, format="PNG"))
    print(f"wrote {path}")
    return path


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except spm.SPMError as e:
        print(f"sample.py: error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
