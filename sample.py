"""
Sample images from Janus-Pro with erased concepts, or without any membranes.

    python sample.py --ckpt runs/mouse/membranes.safetensors --prompt "a photo of a mouse" --compare
    python sample.py --model tiny --prompt "a cat"

Everything about the membranes (model, modules, rank, scope, ...) is read from the checkpoint's metadata.
"""
import sys
from pathlib import Path

import torch
from tqdm import tqdm

import evaluation
import inference
import spm_janus as spm


def build_parser():
    parser = spm.OneLineParser(prog="sample.py", description="Sample Janus-Pro images with and without SPM membranes.")
    g = parser.add_argument_group("model")
    g.add_argument("--ckpt", action="append", default=None,
                   help="a run directory (spm_janus.py's --out) or its membranes.safetensors; repeat to load the "
                        "membranes of several runs together (omit for plain Janus sampling)")
    g.add_argument("--model", default=None, help="base model; overrides the checkpoint's (required without --ckpt)")
    g.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="base weight dtype (default: the run's)")
    g.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cuda, mps or cpu")
    g.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = 1 thread for models narrower than "
                                                                  "512, else torch's default")

    g = parser.add_argument_group("sampling")
    g.add_argument("--prompt", action="append", default=None,
                   help="prompt; repeatable (default: the run's concepts and sample prompts)")
    g.add_argument("--n", type=int, default=None, help="samples per prompt (default: 4, or 32 with --eval)")
    g.add_argument("--seed", type=int, default=0, help="first seed; sample k of a prompt uses seed + k")
    g.add_argument("--cfg", type=float, default=None, help="CFG scale (default: the model's generation config)")
    g.add_argument("--temperature", type=float, default=None, help="temperature (default: the model's)")
    g.add_argument("--strength", type=float, default=1.0, help="membrane multiplier (0 = base model)")
    g.add_argument("--transport", action="store_true",
                   help="facilitated transport: each membrane's strength per prompt is min(1, factor * match), "
                        "match = max(embedding cosine of prompt and concept, share of the concept's tokens in it)")
    g.add_argument("--transport-factor", type=float, default=1.0, help="the factor of --transport")

    g = parser.add_argument_group("checks")
    g.add_argument("--understanding", action="store_true",
                   help="also compare understanding (image+question and text-only) next-token distributions with "
                        "the membranes on and off: KL and top-1 agreement")

    g = parser.add_argument_group("evaluation")
    g.add_argument("--eval", action="store_true",
                   help="sample every prompt with the membranes off (base) and on (erased) with the same seeds, judge "
                        "each picture, print target rate and retention per concept (default prompts: the toy world's "
                        "objects x templates)")
    g.add_argument("--judge", default=None, choices=["toy", "clip", "janus", "nudenet"],
                   help="who names what a picture shows: toy = the toy world's exact judge (the default of --eval); "
                        "clip = zero-shot CLIP over the concept, anchor and neutral labels; janus = the base model "
                        "itself, membranes off, asked 'Is there a {concept} in this image?' (reads P(yes)); nudenet = "
                        "NudeNet's detector of exposed bodies (pip install nudenet). Without --eval, the pictures drawn "
                        "are judged and each prompt's rate printed")
    g.add_argument("--judge-model", default="openai/clip-vit-large-patch14", help="CLIP model of --judge clip")
    g.add_argument("--json", default=None, help="with --eval: write the per-prompt counts to this JSON file")
    g.add_argument("--oracle", default=None,
                   help="with --eval and no --ckpt: evaluate a toy model that never learned a concept (toy_janus.py "
                        "--without CONCEPT, e.g. toy_model_without_mouse) as the erased side, the toy model as the "
                        "base: the floor of every figure")

    g = parser.add_argument_group("output")
    g.add_argument("--compare", action="store_true", help="grid with base and erased columns for the same seeds")
    g.add_argument("--out", default=None, help="directory for samples.png or compare.png (default: sample/ in the "
                                              "first --ckpt's run directory, or runs/sample; --out is no PNG path "
                                              "any more)")
    return parser


def output_path(out, compare, make=True):
    """The grid's file in the --out directory."""
    out = Path(out)
    if out.suffix.lower() in (".png", ".jpg", ".jpeg"):
        raise spm.SPMError(f"--out {out} names a file: --out is a directory, where sample.py writes "
                           f"{'compare' if compare else 'samples'}.png", 2)
    if make:
        out.mkdir(parents=True, exist_ok=True)
    return out / ("compare.png" if compare else "samples.png")


def run(args):
    if args.n is not None and args.n < 1:
        raise spm.SPMError(f"--n {args.n} must be at least 1", 2)
    if args.threads < 0:
        raise spm.SPMError(f"--threads {args.threads} must be at least 0", 2)
    args.n = args.n or (32 if args.eval else 4)
    if args.json and not args.eval:
        raise spm.SPMError("--json goes with --eval", 2)
    if args.out is not None:
        output_path(args.out, args.compare, make=False)  # a file name for --out fails before any weights load
    if args.oracle:
        return evaluate_oracle(args)
    checkpoints = args.ckpt or []
    # one-line errors for missing or bad files; the runs' settings come from their checkpoints
    configs = [spm.Config.from_dict(spm.read_checkpoint(path)[1]["config"]) for path in checkpoints]
    if not checkpoints and (args.compare or args.transport or args.understanding or args.eval):
        raise spm.SPMError("--compare, --transport, --understanding and --eval need --ckpt: there are no membranes", 2)
    models = {c.model for c in configs}
    if len(models) > 1 and not args.model:
        raise spm.SPMError(f"the checkpoints were made for different models ({', '.join(sorted(map(str, models)))}): "
                           f"pass --model", 2)
    model_name = args.model or (configs[0].model if configs else None)
    if not model_name:
        raise spm.SPMError("no model: pass --ckpt of a run, or --model (a hub id, a local directory, or tiny)", 2)
    types = {c.concept_type for c in configs}
    if args.eval and len(types) > 1:
        raise spm.SPMError(f"the checkpoints erase concepts of different types ({', '.join(sorted(types))}): "
                           f"evaluate them one by one", 2)
    concept_type = types.pop() if types else "object"
    args.judge = args.judge or ("toy" if args.eval else None)
    if args.judge == "toy":  # before any weights load
        judge, objects, synonyms = evaluation.toy_judge(model_name, concept_type)
    device = spm.pick_device(args.device)
    spm.set_threads(args.threads, spm.load_config(model_name), device)
    model, tokenizer = spm.load_model(model_name, args.dtype or (configs[0].dtype if configs else "float32"), device)
    loaded = inference.load_all_membranes(checkpoints, model, tokenizer)
    group = inference.MembraneGroup([membranes for membranes, _ in loaded])
    cfg, temperature = spm.generation_defaults(model)
    cfg = args.cfg if args.cfg is not None else cfg
    temperature = args.temperature if args.temperature is not None else temperature
    concepts = [c for config in configs for c in config.concept]
    prompts = args.prompt or [f"a {c}" for c in concepts] + \
        [f"a {c}" for c in (configs[0].anchor_prompts or [] if configs else [])[:3]] or ["a photo of a cat"]
    seeds = list(range(args.seed, args.seed + args.n))

    def strengths(prompt):
        """One strength per loaded membrane set; facilitated transport sets it from the prompt."""
        return [args.strength * (inference.transport_strength(model, tokenizer, prompt, c.concept,
                                                              args.transport_factor) if args.transport else 1.0)
                for c in configs]

    def draw(enabled, prompts):
        """Codes [P, n, N], each prompt at its own strengths."""
        codes = []
        side = ("erased" if loaded else "sampling") if enabled else "base"
        for prompt in tqdm(prompts, desc=f"{side}: {args.n} pictures per prompt", unit="prompt", leave=False,
                           disable=len(prompts) < 4, file=sys.stderr, dynamic_ncols=True):
            with group.switched(enabled, strengths(prompt)):
                codes.append(spm.sample_prompts(model, tokenizer, [prompt], seeds, cfg, temperature)[0])
        return torch.stack(codes)

    if args.transport:
        for prompt in prompts:
            print(f"{prompt!r}: strength " + ", ".join(f"{'+'.join(c.concept)} {s:.3f}"
                                                        for c, s in zip(configs, strengths(prompt))))
    if args.eval:
        run_templates = {t for c in configs for t in c.templates or []}
        anchors = [a for c in configs for a in c.anchor_prompts or []]
        summarised = concept_type if args.judge == "toy" else "object"  # a model's judge names labels, as objects
        if args.judge != "toy":
            objects, synonyms = list(dict.fromkeys(concepts + anchors)), {}
            judge = evaluation.model_judge(args.judge, model, tokenizer, loaded, objects, args.judge_model,
                                           concept_type)
            print(f"--judge {args.judge} knows no synonyms and has no 'blank' label: the synonym rate, H and the "
                  f"blank part of coherence are not measured; the prompts are the run's templates and the "
                  f"{concept_type} preset's held-out ones")
        if args.prompt and summarised in evaluation.KINDS:
            chosen = [evaluation.toy_eval_prompt(p, concept_type) for p in args.prompt]
        elif args.prompt:
            chosen = [evaluation.user_eval_prompt(p, objects, synonyms) for p in args.prompt]
        elif args.judge == "toy":
            chosen = evaluation.eval_prompts(concept_type)
        else:
            held_out = [t for t in spm.PRESETS[concept_type].held_out if spm.known_concepts(tokenizer, [t.format("")])]
            chosen = [evaluation.EvalPrompt(t.format(o), o, o, t) for o in objects
                      for t in sorted(run_templates) + [t for t in held_out if t not in run_templates]]
        with group.disabled():  # base pictures of a few prompts, one seed each
            codes = spm.sample_prompts(model, tokenizer, [p.prompt for p in chosen[::max(1, len(chosen) // 8)]],
                                       seeds[:1], cfg, temperature)
        pictures = spm.decode_images(model, codes[:, 0])
        question = f"Is there a {concepts[0]} in this image ? Answer yes or no ."
        image_drift = inference.understanding_drift(model, tokenizer, group, [question] * len(pictures), pictures)
        text_drift = inference.understanding_drift(model, tokenizer, group, [p.prompt for p in chosen[::4]])
        understanding = {"image_kl": image_drift["kl"], "image_top1": image_drift["top1_agreement"],
                         "text_kl": text_drift["kl"], "text_top1": text_drift["top1_agreement"]}
        return evaluation.evaluate(draw, chosen, judge, args.n, concepts, anchors, objects, run_templates, synonyms,
                                   args.json, understanding, summarised)
    erased = draw(True, prompts)
    rows = [spm.decode_images(model, codes) for codes in erased]
    columns = [f"{'erased' if loaded else 'seed'} {s}" for s in seeds]
    if args.compare:
        base = draw(False, prompts)
        rows = [torch.cat([spm.decode_images(model, b), r]) for b, r in zip(base, rows)]
        columns = [f"base {s}" for s in seeds] + columns
    if args.judge:  # what the judge calls each prompt's pictures: the rate of the erased concept (or of any label)
        if args.judge != "toy":
            judge = evaluation.model_judge(args.judge, model, tokenizer, loaded,
                                           list(dict.fromkeys(concepts or ["nudity"])), args.judge_model, concept_type)
        sides = [("erased", erased)] + ([("base", base)] if args.compare else [])
        for i, prompt in enumerate(prompts):
            parts = []
            for name, codes in sides:
                labels = judge(codes[i], [prompt] * len(codes[i]))
                counts = {label: labels.count(label) for label in dict.fromkeys(labels)}
                target = concepts[0] if concepts else None  # the toy names 'object/colour/style' of a style run
                hits = sum(label == target or target in label.split("/") for label in labels) if target else 0
                rate = f"{target} {hits / len(labels):.0%}; " if target else ""
                parts.append(f"{name if loaded else 'drawn'}: {rate}" + ", ".join(f"{k} {v}" for k, v in counts.items()))
            print(f"judge {args.judge}, {prompt!r}: " + "; ".join(parts))
    default = spm.checkpoint_path(checkpoints[0]).parent / "sample" if checkpoints else Path("runs", "sample")
    path = output_path(args.out or default, args.compare)
    grid = spm.image_grid(rows, prompts, columns)
    spm.save_atomic(path, lambda tmp: grid.save(tmp, format="PNG"))
    print(f"wrote {path}")
    if args.understanding:
        # the pictures just drawn, each asked about the first erased concept; then the prompts as text alone
        images = torch.cat(rows)
        question = f"Is there a {concepts[0]} in this image ? Answer yes or no ." if concepts else "What is this ?"
        for name, questions, pictures in (("image+question", [question] * len(images), images),
                                          ("text only", prompts, None)):
            for (membranes, _), c in zip(loaded, configs):
                drift = inference.understanding_drift(model, tokenizer, membranes, questions, pictures)
                print(f"understanding, {name}, {'+'.join(c.concept)} (scope {membranes.scope}): "
                      f"KL {drift['kl']:.3g}, top-1 agreement {drift['top1_agreement']:.3f}, "
                      f"max |logit diff| {drift['max_abs_logit_diff']:.3g}")
    return path


def evaluate_oracle(args):
    """sample.py --eval --oracle DIR: the toy model as the base, the oracle as the erased model, and the summary of
    the concept it was built without, on the prompts and template split of a run of that concept."""
    if not args.eval or args.ckpt:
        raise spm.SPMError("--oracle goes with --eval and without --ckpt: it is the erased side itself", 2)
    if not evaluation.is_toy_world(args.oracle):
        raise spm.SPMError(f"--oracle {args.oracle}: not a model built by toy_janus.py --without", 2)
    import json as json_
    import toy_janus as toy

    concept = (json_.loads((Path(args.oracle) / "config.json").read_text()).get("toy_world") or {}).get("without")
    if not concept:
        raise spm.SPMError(f"--oracle {args.oracle} was built with every concept: build one with toy_janus.py "
                           f"--without", 2)
    concept_type = {"object": "object", "color": "attribute", "style": "style"}[toy.meaning(concept)[0]]
    judge, objects, synonyms = evaluation.toy_judge("toy", concept_type)
    device = spm.pick_device(args.device)
    spm.set_threads(args.threads, spm.load_config("toy"), device)
    models = {False: spm.load_model("toy", "float32", device), True: spm.load_model(args.oracle, "float32", device)}
    cfg, temperature = spm.generation_defaults(models[False][0])
    seeds = list(range(args.seed, args.seed + args.n))

    def draw(erased, prompts):
        model, tokenizer = models[erased]
        progress = tqdm(prompts, desc=f"{'oracle' if erased else 'base'}: {args.n} pictures per prompt",
                        unit="prompt", leave=False, file=sys.stderr, dynamic_ncols=True)
        return torch.stack([spm.sample_prompts(model, tokenizer, [p], seeds, cfg, temperature)[0] for p in progress])

    run = spm.Config(model="toy", concept=concept, concept_type=concept_type).resolved(*models[False])
    print(f"the oracle {args.oracle} (never saw {concept}) as the erased model; the toy model as the base")
    # nothing is anchored in a model retrained without the concept: every other object counts as non-anchored
    return evaluation.evaluate(draw, evaluation.eval_prompts(concept_type), judge, args.n, [concept], [], objects,
                               set(run.templates), synonyms, args.json, None, concept_type)


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except spm.SPMError as e:
        print(f"sample.py: error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
