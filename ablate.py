"""
The erasure benchmark on the toy Janus: erase "mouse" with each setting at one step budget, then judge every sample.

    python ablate.py                       # all settings x 3 seeds -> runs/ablation/ablation.{md,json,png}
    python ablate.py --seeds 1 --n 16      # a quick table
    python ablate.py --pair mouse cat      # two membranes of the README's command (built-in anchors), loaded together

One fixed protocol for every setting: the settings that anchor name cat, car and tree explicitly, so dog, bird, fish
and house are never anchored and measure specificity on concepts nobody protected. Each setting trains with
spm_janus.py's own train() (in this process), then samples every toy prompt (objects and their synonyms x templates)
with the same evaluation seeds, and evaluation.py's summary turns the exact judge's labels into the figures of the table.
"""
import contextlib
import dataclasses
import json
import re
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

import attack
import evaluation
import inference
import spm_janus as spm
import toy_janus as toy

ANCHORS = ("cat", "car", "tree")  # the benchmark's anchored objects; the other four are never anchored
# --quick's keys that are not Config fields (--quick alone takes them): with anchor_vocabulary, the non-anchored
# objects' words (and their synonyms) are left out of the vocabulary anchors, so that the non-anchored figure measures
# objects no anchor names; and the oracle's distribution as the target (OracleTargetTrainer)
HOLD_OUT, ORACLE_TARGET = "hold_out_objects", "oracle_target"
ANCHORED = dict(anchor="prompts", anchor_prompts=list(ANCHORS))
POSTER = dict(scope="image", anchor="none")  # the poster's membranes acted on the image positions, no anchoring
# (name, Config settings). The anchoring rows add the benchmark's anchors back to the poster's settings.
SETTINGS = [
    ("MSE/MLP (all)", dict(POSTER, loss="mse", layers="mlp")),
    ("MSE/Attn", dict(POSTER, loss="mse", layers="attn")),
    ("KL/Attn", dict(POSTER, loss="kl", layers="attn")),
    ("KL/Attn, scope prompt", dict(POSTER, loss="kl", layers="attn", scope="prompt")),
    ("KL/Attn, scope all (+text encoder)", dict(POSTER, loss="kl", layers="attn", scope="all")),
    ("KL/Attn+MLP (all)", dict(POSTER, loss="kl", layers="attn+mlp")),
    # The toy has 2 decoder layers, so "7 modules" is read as the 7 projections (q,k,v,o,gate,up,down) of layer 0.
    ("KL/Attn+MLP (7 modules)", dict(POSTER, loss="kl", layers="attn+mlp", attn_layer_ids="0", mlp_layer_ids="0")),
    ("KL/Attn, substitute 'real mouse'", dict(POSTER, loss="kl", layers="attn", surrogate="real mouse")),
    ("KL/Attn + latent anchoring", dict(POSTER, loss="kl", layers="attn", anchor="latent")),
    ("KL/Attn + prompt anchoring", dict(POSTER, loss="kl", layers="attn", **ANCHORED)),
    ("KL/Attn, scope prompt + prompt anchoring (first release's default)", dict(loss="kl", layers="attn",
                                                                              scope="prompt", **ANCHORED)),
    ("default", dict(loss="kl", layers="attn", **ANCHORED)),
]
# The robustness levers (--levers), each on top of the first release's default: scope prompt, prompt anchoring.
LEVERS = [
    ("lever: augment", dict(augment=1)),
    ("lever: eta 0", dict(eta=0)),
    ("lever: augment, eta 0", dict(augment=1, eta=0)),
    ("lever: augment, adversarial soft", dict(augment=1, adversarial="soft")),
    ("lever: augment, eta 0, adversarial soft", dict(augment=1, eta=0, adversarial="soft")),
    ("lever: augment, eta 0.5, rollout target", dict(augment=1, eta=0.5, rollout="target")),
    ("lever: scope image, augment, eta 0, adversarial soft", dict(scope="image", augment=1, eta=0,
                                                                  adversarial="soft")),
    ("lever: scope image + augment", dict(scope="image", augment=1)),
    ("lever: scope image + augment + adversarial soft", dict(scope="image", augment=1, adversarial="soft")),
    ("lever: scope all + augment + adversarial soft", dict(scope="all", augment=1, adversarial="soft")),
    ("lever: layer 1 only, augment", dict(attn_layer_ids="1", augment=1)),
    ("lever: augment, adversarial soft every 5 x 40", dict(augment=1, adversarial="soft", adversarial_every=5,
                                                           adversarial_steps=40)),
    ("lever: augment, adversarial soft, 400 steps (default)", dict(augment=1, adversarial="soft", steps=400)),
    ("lever: augment, adversarial soft, 400 steps, anchor weight 10", dict(augment=1, adversarial="soft", steps=400,
                                                                          anchor_weight=10)),
    ("lever: augment, eta 0, rollout target, loss on cfg", dict(augment=1, eta=0, rollout="target", loss_on="cfg")),
]
# The robustness defaults came after the poster and the first release: every row but "default" switches them off
# first, so that it reproduces the setting it names whatever today's defaults are.
FIRST_RELEASE = dict(augment=0, adversarial="none", steps=200)
SETTINGS = [(name, settings if name == "default" else {**FIRST_RELEASE, **settings}) for name, settings in SETTINGS]
LEVERS = [(name, {**FIRST_RELEASE, **ANCHORED, **settings}) for name, settings in LEVERS]
# (column, summary key, scale, digits): every figure of evaluation.py's summary that ranks a setting
COLUMNS = [("mouse, trained %", "trained_rate", 100, 1), ("mouse, held-out %", "held_out_rate", 100, 1),
           ("mouse, synonyms %", "synonyms_rate", 100, 1), ("anchored kept %", "anchored_kept", 100, 1),
           ("non-anchored kept %", "non_anchored_kept", 100, 1), ("coherence %", "coherence", 100, 1),
           ("H", "H", 1, 3), ("discrete attack ASR % (mean over tried)", "discrete", 100, 1),
           ("soft attack ASR %", "soft_asr", 100, 1), ("understanding KL, image / text", "understanding", 1, 3),
           ("train s", "seconds", 1, 0)]


# The concept-type block (--types): one style and one colour of the toy, with the defaults plus --concept-type, and the
# same with the empty prompt as the surrogate instead of the prompt without the concept's word.
TYPES = [("style: pastel", dict(concept_type="style", concept=["pastel"])),
         ("style: pastel, surrogate '' (empty prompt)", dict(concept_type="style", concept=["pastel"], surrogate="")),
         ("attribute: red", dict(concept_type="attribute", concept=["red"])),
         ("attribute: red, surrogate '' (empty prompt)", dict(concept_type="attribute", concept=["red"], surrogate=""))]
TYPE_COLUMNS = [("erased word, trained %", "trained_rate"), ("held-out %", "held_out_rate"),
                ("synonyms %", "synonyms_rate"), ("object kept %", "object_kept"),
                ("other styles / colours kept %", "other_values"), ("other objects kept %", "other_objects"),
                ("coherence %", "coherence"), ("H", "H"), ("train s", "seconds")]
TYPE_FIGURE = ["a pastel cat", "a red car", "a dog"]


# The peers (--peers), each as flags of spm_janus.py's trainer, on the benchmark's protocol (anchors cat, car, tree),
# with the oracle (toy_model_without_mouse, a model that never learned the mouse) as the floor row.
PEERS = [
    ("EAR-style: full-rank deltas on layer 0's attention, MSE on the image steps' hidden states",
     dict(rank="full", layers="attn", attn_layer_ids="0", scope="all", loss="hidden", augment=0, adversarial="none",
          **ANCHORED)),
    ("ESD-style: full-rank deltas on every attention projection, the logit target",
     dict(rank="full", layers="attn", scope="all", augment=0, adversarial="none", **ANCHORED)),
    ("SPM, the poster's KL/Attn (scope image, 200 steps) + prompt anchoring",
     dict(FIRST_RELEASE, loss="kl", layers="attn", scope="image", **ANCHORED)),
    ("SPM, today's default", dict(**ANCHORED)),
]
ORACLE = "toy_model_without_mouse"
BUDGETS = "10,30,100,300"  # the soft attack's Adam steps in the peers' curves
PEER_COLUMNS = [("mouse, held-out %", "held_out_rate", 100, 1), ("mouse, synonyms %", "synonyms_rate", 100, 1),
                ("anchored kept %", "anchored_kept", 100, 1), ("non-anchored kept %", "non_anchored_kept", 100, 1),
                ("coherence %", "coherence", 100, 1), ("H", "H", 1, 3),
                ("discrete attack ASR % (mean over tried)", "discrete", 100, 1),
                ("soft ASR % at 300 steps", "curve_300", 100, 1),
                ("soft: steps to 50% (x the base's)", "budget_50", 1, 0),
                ("trainable parameters", "parameters", 1, 0), ("train s", "seconds", 1, 0)]


def budget_curve_args(n, attack_seed):
    """attack.py's arguments of the budget curves: BUDGETS, 4 tokens, the mean over 2 restarts, from random words
    (from the concept's own words the base model draws it before any step: a budget is counted from a start that
    draws nothing)."""
    args = attack.build_parser().parse_args(["--ckpt", "-", "--n", str(n), "--soft-budgets", BUDGETS,
                                             "--soft-restarts", "2", "--seed", str(attack_seed), "--soft-init", "vocab"])
    attack.check_args(args)
    return args


def budget_curve(target, references, curve_args, desc="soft attack budgets"):
    """The soft attack's ASR at every budget against `target` as it is now, and its 50% budget."""
    with tqdm(total=curve_args.soft_restarts, desc=desc, leave=False, file=sys.stderr) as progress:
        points = attack.soft_curve(target, references, curve_args, "mouse", progress)[4]
    return {"curve_300": points[300], "budget_50": attack.budget_at(points), "curve": points}


def flat_figures(summary):
    """The per-seed figures of one setting that the table shows, from evaluation.summarize()'s summary of mouse."""
    return {"trained_rate": summary["trained_rate"], "held_out_rate": summary["held_out_rate"],
            "synonyms_rate": summary["synonyms_rate"], "anchored_kept": summary["anchored"]["erased"],
            "non_anchored_kept": summary["non_anchored"]["erased"],
            "non_anchored_retention": summary["non_anchored"]["retention"], "coherence": summary["coherence"],
            "H": summary["H"]}


def cell(rows, key, scale=100.0, digits=1):
    values = [r[key] * scale for r in rows if r.get(key) is not None]
    if not values:
        return "-"
    spread = f" ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.{digits}f}{spread}"


def table(base, base_asr, results, args, num_prompts, columns=COLUMNS, base_budget=None):
    lines = [f"Base model: mouse {100 * base['base_trained_rate']:.1f}% (trained templates) / "
             f"{100 * base['base_held_out_rate']:.1f}% (held-out) / {100 * base['base_synonyms_rate']:.1f}% "
             f"(synonyms); anchored objects {100 * base['anchored']['base']:.1f}%, non-anchored "
             f"{100 * base['non_anchored']['base']:.1f}% drawn right. {args.n} samples per prompt, {num_prompts} "
             f"prompts (evaluation seeds from {args.eval_seed}), {args.seeds} training seed(s) per setting (mean ± std "
             f"over seeds). Attacks (seed {args.attack_seed}): "
             + (", ".join(f"{name} ASR {100 * asr:.1f}% on the base model" for name, asr in base_asr.items())
                or "not run") + f" ({args.n} fresh samples per final prompt).", "",
             "| setting | " + " | ".join(c for c, *_ in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    if base_budget is not None:
        lines.insert(1, f"The soft attack (4 tokens from random vocabulary words, the mean over 2 restarts, cond "
                        f"likelihood of base pictures) reaches 50% on the base model after {base_budget} Adam steps (budgets {BUDGETS}; 'never': not within 300).")
    for r in results:
        rows = r["seeds"]
        cells = []
        for _, key, scale, digits in columns:
            if key == "understanding":
                cells.append(f"{cell(rows, 'understanding_kl_image', 1, 3)} / {cell(rows, 'understanding_kl_text', 1, 3)}")
            elif key == "discrete":
                cells.append(f"{cell(rows, 'discrete_asr')} ({cell(rows, 'discrete_mean')})")
            elif key == "budget_50":
                found = [str(r["budget_50"]) if r["budget_50"] is not None else "never" for r in rows]
                ratios = [f"{r['budget_50'] / base_budget:.1f}x" for r in rows if r["budget_50"] and base_budget]
                cells.append(" / ".join(found) + (f" ({' / '.join(ratios)})" if ratios else ""))
            elif key == "parameters":
                cells.append(str(rows[0].get("parameters", "-")))
            else:
                cells.append(cell(rows, key, scale, digits))
        lines.append(f"| {r['setting']} | " + " | ".join(cells) + " |")
    return lines


def build_parser():
    parser = spm.OneLineParser(prog="ablate.py", description="The erasure benchmark and the poster's ablations on "
                                                             "the toy Janus.")
    parser.add_argument("--steps", type=int, default=None, help="erasure steps per run (default: spm_janus.py's)")
    parser.add_argument("--seeds", type=int, default=3, help="training seeds per setting")
    parser.add_argument("--first-seed", type=int, default=0, help="the first training seed")
    parser.add_argument("--n", type=int, default=32, help="samples per evaluation prompt")
    parser.add_argument("--only", action="append", default=None,
                        help="run only settings (and levers) whose name contains this, or is this")
    parser.add_argument("--levers", action="store_true", help="also run the robustness levers")
    parser.add_argument("--types", action="store_true",
                        help="run the concept-type block instead: a style and a colour, each with two surrogates. "
                             "With --quick KEY=VALUE: those overrides on every row (pick rows with --only)")
    parser.add_argument("--peers", action="store_true", help="run the peers instead: EAR-style, ESD-style, SPM (the "
                                                             "poster's and today's default) and the oracle, with the "
                                                             "soft attack's budget curve")
    parser.add_argument("--quick", action="append", default=None, metavar="KEY=VALUE",
                        help="instead of a table: train today's default with the benchmark's anchors and these Config "
                             "overrides (repeatable, e.g. latent_eps=0.5; 'default' for none) for each of --seeds from "
                             "--first-seed, judge it with --n samples per prompt from --eval-seed, and run the soft "
                             "attack's budget curve; one JSON line per training seed. Two keys are not Config "
                             "fields: hold_out_objects=true (with anchor_vocabulary: the non-anchored objects' words "
                             "left out of it) and oracle_target=true (a diagnostic: the oracle's distribution as the "
                             "concept rows' target)")
    parser.add_argument("--depth", nargs="+", default=None, metavar="JSONL",
                        help="instead of a run: the per-seed table of --quick's JSON lines (files of its output) and "
                             "the trade-off plot of the soft attack's ASR at 100 and 300 steps against non-anchored "
                             "retention, with the peers of --peer-results and the oracle, into --out")
    parser.add_argument("--pair", nargs=2, default=None, metavar="OBJECT",
                        help="instead of a table: for each of --seeds, train both objects with the README's default "
                             "command (its built-in anchors) into --runs, load the two membranes together and judge "
                             "every prompt without and with facilitated transport: the other objects kept, each "
                             "object's rates, and each drawn on the other's prompts; one JSON line per seed and "
                             "transport. With --quick KEY=VALUE: those overrides on both runs")
    parser.add_argument("--pair-avoid", action="store_true",
                        help="with --pair: each object's run also gets --avoid <the other object>")
    parser.add_argument("--pair-stack", action="store_true",
                        help="with --pair: the second object's run trains on top of the first's membranes "
                             "(--on-top), so that its teacher and anchors are the first object's erased model")
    parser.add_argument("--peer-results", nargs="*", default=[], metavar="JSON",
                        help="ablation.json files of --peers runs, drawn on the --depth plot")
    parser.add_argument("--eval-seed", type=int, default=1000, help="first evaluation seed (training never samples it)")
    parser.add_argument("--attack-seed", type=int, default=0, help="seed of attack.py's searches and samples")
    parser.add_argument("--out", default="runs/ablation", help="directory for ablation.md, ablation.json and "
                                                               "ablation.png")
    parser.add_argument("--runs", default="runs/ablation", help="directory for the runs' checkpoints")
    parser.add_argument("--attack", action="append", default=None, choices=["discrete", "soft", "none"],
                        help="attack.py attacks run on every run, at attack.py's default budgets (default: discrete "
                             "and soft; none = no attacks)")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    for flag, value, least in (("--seeds", args.seeds, 1), ("--n", args.n, 1), ("--steps", args.steps or 1, 1),
                               ("--first-seed", args.first_seed, 0)):
        if value < least:
            build_parser().error(f"{flag} {value} must be at least {least}")
    for flag, value in (("--pair-avoid", args.pair_avoid), ("--pair-stack", args.pair_stack)):
        if value and not args.pair:
            build_parser().error(f"{flag} is a setting of --pair: add --pair OBJECT OBJECT")
    if args.depth:
        return depth_table(args)
    torch.set_num_threads(1)
    if args.types:
        return concept_types(args)
    if args.pair:
        return pair(args)
    if args.quick:
        return quick(args)
    candidates = PEERS if args.peers else SETTINGS + (LEVERS if args.levers or args.only else [])
    settings = only(candidates, args.only)

    model, tokenizer = spm.load_model("toy")
    cfg, temperature = spm.generation_defaults(model)
    seeds = list(range(args.eval_seed, args.eval_seed + args.n))  # evaluation seeds, unused in training
    prompts = evaluation.eval_prompts()
    judge, _, synonyms = evaluation.toy_judge("toy")

    def draw(erased, text_prompts):  # the membranes attached at the time decide base or erased
        progress = tqdm(text_prompts, desc=f"{'erased' if erased else 'base'}: {args.n} pictures per prompt",
                        unit="prompt", leave=False, file=sys.stderr, dynamic_ncols=True)
        return torch.stack([spm.sample_prompts(model, tokenizer, [p], seeds, cfg, temperature)[0] for p in progress])

    base_codes = draw(False, [p.prompt for p in prompts])
    base = evaluation.summarize(evaluation.judge_records(lambda *_: base_codes, prompts, judge, args.n), ["mouse"], ANCHORS,
                            toy.OBJECTS, set(spm.DEFAULT_TEMPLATES), synonyms)["mouse"]
    attacks = [a for a in (args.attack or ["discrete", "soft"]) if a != "none"]
    attack_args = attack.build_parser().parse_args(["--ckpt", "-", "--n", str(args.n), "--out", f"{args.runs}/soft"])
    target = attack.Target(model, tokenizer, judge, "mouse", cfg, temperature, args.n, seed=args.attack_seed)
    templates = attack.toy_templates()
    references = attack.concept_references(target, "mouse", templates, attack_args.references)

    def attacked(tag):
        """{name: the attack's record} against the model as it is now."""
        return {name: attack.run_attack(name, target, references, ["mouse"], [], templates, attack_args, tag)[0]
                for name in attacks}

    base_asr = {name: found["asr"] for name, found in attacked("base").items()}
    curve_args = budget_curve_args(args.n, args.attack_seed)
    curve = lambda on: budget_curve(on, references, curve_args)  # noqa: E731

    base_curve = curve(target) if args.peers else None
    figure_prompts = ["a mouse", "a rodent", "a cat", "a dog"]
    step0 = spm.sample_prompts(model, tokenizer, figure_prompts, [seeds[0]], cfg, temperature)[:, 0]
    figure_rows, results, runs = [], [], len(settings) * args.seeds
    for name, overrides in settings:
        per_seed = []
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            print(f"[run {len(results) * args.seeds + len(per_seed) + 1}/{runs}] {name}, training seed {seed}",
                  file=sys.stderr, flush=True)
            out = Path(args.runs) / f"{re.sub('[^a-z0-9]+', '-', name.lower()).strip('-')}-s{seed}"
            config = spm.Config(**{**overrides, "model": "toy", "concept": ["mouse"], "seed": seed, "out": str(out),
                                   "sample_every": 0, "save_every": 0, **({"steps": args.steps} if args.steps else {})})
            started = time.time()
            run = spm.train(config, overwrite=True)
            seconds = time.time() - started
            membranes, _ = spm.load_membranes(out / spm.CHECKPOINT_NAME, model, tokenizer)
            records = evaluation.judge_records(draw, prompts, judge, args.n, base_codes)
            summary = evaluation.summarize(records, ["mouse"], run.anchor_prompts or [], toy.OBJECTS,
                                       set(run.templates), synonyms)["mouse"]
            pictures = spm.decode_images(model, base_codes[::27, 0])  # one base picture of every eighth prompt
            drift_image = inference.understanding_drift(model, tokenizer, membranes, ["is there a mouse ?"] * len(pictures),
                                                  pictures)
            drift_text = inference.understanding_drift(model, tokenizer, membranes, [p.prompt for p in prompts[::4]])
            found = attacked(out.name)
            attack_figures = {"discrete_asr": found.get("discrete", {}).get("asr"),
                              "discrete_mean": found.get("discrete", {}).get("mean_rate"),
                              "soft_asr": found.get("soft", {}).get("asr"),
                              "discrete_prompt": found.get("discrete", {}).get("prompt"),
                              "parameters": membranes.num_parameters(), **(curve(target) if args.peers else {})}
            if seed == args.first_seed:
                last = spm.sample_prompts(model, tokenizer, figure_prompts, [seeds[0]], cfg, temperature)[:, 0]
                figure_rows.append((name, last))
            membranes.detach()
            per_seed.append({**flat_figures(summary), **attack_figures, "seconds": seconds, "understanding_kl_image": drift_image["kl"],
                             "understanding_kl_text": drift_text["kl"], "summary": summary})
            pct = evaluation.percent
            print(f"{name} seed {seed}: mouse {pct(summary['trained_rate'])} trained / {pct(summary['held_out_rate'])} "
                  f"held-out / {pct(summary['synonyms_rate'])} synonyms; kept {pct(summary['anchored']['erased'])} "
                  f"anchored, {pct(summary['non_anchored']['erased'])} non-anchored; coherence "
                  f"{pct(summary['coherence'])}; H {summary['H']}; attacks "
                  f"{ {k: v for k, v in attack_figures.items() if v is not None} }; {seconds:.0f} s", flush=True)
        results.append({"setting": name, "settings": overrides, "seeds": per_seed})
    if args.peers:  # the floor: a model that never learned the mouse, judged and attacked the same way
        results.append(oracle_row(args, prompts, judge, draw, base_codes, synonyms, attacks, attack_args, references,
                                  templates, curve_args, cfg, temperature, seeds, figure_prompts, figure_rows))

    lines = table(base, base_asr, results, args, len(prompts), PEER_COLUMNS if args.peers else COLUMNS,
                  base_curve["budget_50"] if base_curve else None)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablation.md").write_text("\n".join(lines) + "\n")
    (out / "ablation.json").write_text(json.dumps({"base": base, "base_asr": base_asr, "results": results, "n": args.n,
                                               "seeds": args.seeds}, indent=1))
    # one row per setting, labelled in full at the left: column labels of a setting each would overlap
    rows = [spm.decode_images(model, step0)] + [spm.decode_images(model, codes) for _, codes in figure_rows]
    labels = ["base model (step 0)"] + [name for name, _ in figure_rows]
    width = 6 * max(len(label) for label in labels) + 12
    spm.image_grid(rows, labels, figure_prompts, cell=64, label_width=width).save(out / "ablation.png")
    print("\n".join(lines))
    print(f"wrote {out / 'ablation.md'}, {out / 'ablation.json'}, {out / 'ablation.png'}")


def oracle_row(args, prompts, judge, draw, base_codes, synonyms, attacks, attack_args, references, templates,
               curve_args, cfg, temperature, seeds, figure_prompts, figure_rows):
    """The peers table's floor row: the oracle as the erased model."""
    oracle, tokenizer = load_oracle("--peers")

    def draw_oracle(_, text_prompts):
        return torch.stack([spm.sample_prompts(oracle, tokenizer, [p], seeds, cfg, temperature)[0] for p in
                            tqdm(text_prompts, desc="oracle", leave=False, file=sys.stderr)])

    records = evaluation.judge_records(draw_oracle, prompts, judge, args.n, base_codes)
    summary = evaluation.summarize(records, ["mouse"], list(ANCHORS), toy.OBJECTS, set(spm.DEFAULT_TEMPLATES),
                                   synonyms)["mouse"]
    target = attack.Target(oracle, tokenizer, judge, "mouse", cfg, temperature, args.n, seed=args.attack_seed)
    found = {name: attack.run_attack(name, target, references, ["mouse"], [], templates, attack_args, "oracle")[0]
             for name in attacks}
    oracle_curve = budget_curve(target, references, curve_args, "soft attack budgets (oracle)")
    figure_rows.append(("oracle (never learned the mouse)", spm.sample_prompts(oracle, tokenizer, figure_prompts,
                                                                               [seeds[0]], cfg, temperature)[:, 0]))
    row = {**flat_figures(summary), "discrete_asr": found.get("discrete", {}).get("asr"),
           "discrete_mean": found.get("discrete", {}).get("mean_rate"), "soft_asr": found.get("soft", {}).get("asr"),
           **oracle_curve, "parameters": "all (retrained without it)", "summary": summary}
    return {"setting": f"the oracle: {ORACLE} (the floor)", "settings": {}, "seeds": [row]}


def only(candidates, names):
    """--only's settings: a full name means that one, any other text every setting whose name contains it."""
    exact = {o for o in names or [] if o in {name for name, _ in candidates}}
    return [s for s in candidates if not names or s[0] in exact or any(o in s[0] for o in names if o not in exact)]


def quick_overrides(items, mode=None):
    """--quick's KEY=VALUE items as Config overrides: numbers, booleans and JSON lists as such, other values as text.
    mode: the other mode they modify (--pair, --types), which takes Config fields only."""
    overrides = {}
    for item in items:
        if item == "default":
            continue
        key, equals, value = item.partition("=")
        if not equals or key not in {f.name for f in dataclasses.fields(spm.Config)} | {HOLD_OUT, ORACLE_TARGET}:
            build_parser().error(f"--quick {item!r}: give KEY=VALUE with a Config field as KEY, e.g. latent_eps=0.5")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    if mode and {HOLD_OUT, ORACLE_TARGET} & set(overrides):
        build_parser().error(f"{mode} --quick: {HOLD_OUT} and {ORACLE_TARGET} belong to --quick's own runs; drop them")
    return overrides


class OracleTargetTrainer(spm.Trainer):
    """A diagnostic, not a method (it needs a model that never learned the concept): the concept rows are trained
    towards the oracle's own distribution on them (its logits on the same prompts and rollout, CFG-combined under
    --loss-on cfg), instead of the erasure target, so that a run shows what depth the target itself can buy."""

    def __init__(self, *args, oracle, **kwargs):
        super().__init__(*args, **kwargs)
        self.oracle = oracle

    @torch.no_grad()
    def erasure_target(self, batch, codes, teacher):
        rows, embed = batch.rows["concept"], self.oracle.get_input_embeddings()
        ids, mask = batch.input_ids[rows.start:rows.stop], batch.mask[rows.start:rows.stop]
        parts = [(embed(ids), mask, codes["concept"])]
        if self.config.loss_on == "cfg":
            parts.append((embed(spm.unconditional_ids(ids, self.tokenizer)), mask, codes["concept"]))
        return self.distribution(*spm.batched_image_logits(self.oracle, parts))


def load_oracle(needed_by):
    """(model, tokenizer) of the toy's oracle (toy_model_without_mouse), or a one-line error naming `needed_by`."""
    oracle_dir = Path(__file__).resolve().with_name(ORACLE)
    if not (oracle_dir / "config.json").is_file():
        raise SystemExit(f"ablate.py: error: {needed_by} needs the oracle {oracle_dir}: build it with "
                         f"`python toy_janus.py --without mouse`")
    return spm.load_model(str(oracle_dir))


def quick_trainer(overrides, model, tokenizer, membranes, config, levers):
    """--quick's Trainer: spm_janus.py's own, or with oracle_target=true the oracle's distribution as the target."""
    if not overrides.get(ORACLE_TARGET):
        return spm.Trainer(model, tokenizer, membranes, config, levers=levers)
    if config.loss == "hidden":
        build_parser().error(f"--quick {ORACLE_TARGET}=true: the oracle's hidden states are another model's; use "
                             f"--loss kl or mse")
    oracle = load_oracle(f"--quick {ORACLE_TARGET}=true")[0]
    return OracleTargetTrainer(model, tokenizer, membranes, config, levers=levers, oracle=oracle)


def quick(args):
    """--quick: the default with the benchmark's anchors and some overrides, trained through the Trainer, judged and
    attacked by the soft attack's budget curve, per training seed."""
    overrides = quick_overrides(args.quick)
    if overrides.get(HOLD_OUT) and not overrides.get("anchor_vocabulary"):
        build_parser().error(f"--quick {HOLD_OUT}=true holds words out of the vocabulary anchors: add --quick "
                             f"anchor_vocabulary=N")
    model, tokenizer = spm.load_model("toy")
    cfg, temperature = spm.generation_defaults(model)
    judge, _, synonyms = evaluation.toy_judge("toy")
    seeds = list(range(args.eval_seed, args.eval_seed + args.n))
    curve_args = budget_curve_args(16, args.attack_seed)
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        settings = {k: v for k, v in overrides.items() if k not in (HOLD_OUT, ORACLE_TARGET)}
        config = spm.Config(model="toy", concept="mouse", seed=seed, **{**ANCHORED, **settings}).resolved(model,
                                                                                                         tokenizer)
        levers = spm.levers_for(config)
        vocabulary = next((lever for lever in levers if isinstance(lever, spm.VocabularyAnchoring)), None)
        if overrides.get(HOLD_OUT):
            named = config.concept + config.anchor_prompts
            vocabulary.exclude = [w for o in toy.OBJECTS if o not in named for w in toy.words_for(o)]
        membranes = spm.attach_for(model, tokenizer, config)
        trainer, started = quick_trainer(overrides, model, tokenizer, membranes, config, levers), time.time()
        for _ in tqdm(range(config.steps), desc=f"training seed {seed}", leave=False, file=sys.stderr):
            trainer.step()
        seconds = time.time() - started

        def draw(enabled, texts):
            with membranes.switched(enabled):
                return torch.stack([spm.sample_prompts(model, tokenizer, [t], seeds, cfg, temperature)[0]
                                    for t in texts])

        with trainer.published():  # what the run's checkpoint would hold (--ema's average, --select-every's best)
            records = evaluation.judge_records(draw, evaluation.eval_prompts(), judge, args.n)
            summary = evaluation.summarize(records, config.concept, config.anchor_prompts, toy.OBJECTS,
                                           set(config.templates), synonyms)
            target = attack.Target(model, tokenizer, judge, "mouse", cfg, temperature, 16, seed=args.attack_seed)
            with membranes.disabled():
                references = attack.concept_references(target, "mouse", attack.toy_templates(),
                                                       curve_args.references)
            curve = budget_curve(target, references, curve_args)
        membranes.detach()
        words = {"vocabulary_words": vocabulary.words, "vocabulary_left_out": vocabulary.left_out} if vocabulary else {}
        selection = next((lever for lever in levers if isinstance(lever, spm.CheckpointSelection)), None)
        if selection:
            words["selected_step"] = selection.best["step"]
        print(json.dumps({"overrides": overrides, "seed": seed, "seconds": round(seconds), **words,
                          **flat_figures(summary["mouse"]), "dog": summary["mouse"]["per_object"]["dog"]["erased"],
                          "curve": curve["curve"], "budget_50": curve["budget_50"]}), flush=True)


def pair(args):
    """--pair A B: two default membranes on one model, judged as `sample.py --eval --ckpt A --ckpt B [--transport]`
    judges them, against one base drawn once."""
    overrides = quick_overrides(args.quick or [], "--pair")
    settings = {**({"steps": args.steps} if args.steps else {}), **overrides}  # --quick's win, as they did
    if any(o not in toy.OBJECTS for o in args.pair) or args.pair[0] == args.pair[1]:
        build_parser().error(f"--pair {' '.join(args.pair)}: give two different toy objects, from "
                             f"{', '.join(toy.OBJECTS)}")
    model, tokenizer = spm.load_model("toy")
    cfg, temperature = spm.generation_defaults(model)
    seeds = list(range(args.eval_seed, args.eval_seed + args.n))
    (judge, _, synonyms), prompts = evaluation.toy_judge("toy"), evaluation.eval_prompts()
    texts = [p.prompt for p in prompts]
    base_codes = torch.stack([spm.sample_prompts(model, tokenizer, [t], seeds, cfg, temperature)[0] for t in texts])
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        runs, seconds = [], []
        for concept in args.pair:
            out = Path(args.runs) / f"{concept}-s{seed}"
            started = time.time()
            with contextlib.redirect_stdout(sys.stderr):  # stdout is the JSON lines
                levers = {"avoid": [o for o in args.pair if o != concept]} if args.pair_avoid else {}
                if args.pair_stack and runs:
                    levers["on_top"] = [str(runs[0].out)]
                runs.append(spm.train(spm.Config(**{**settings, **levers}, model="toy", concept=concept, seed=seed,
                                                 out=str(out), sample_every=0, save_every=0), overwrite=True))
            seconds.append(round(time.time() - started))
        group = inference.MembraneGroup([m for m, _ in inference.load_all_membranes([r.out for r in runs], model,
                                                                                    tokenizer)])
        for transport in (False, True):
            def draw(enabled, texts):
                codes = []
                for text in texts:
                    strengths = [inference.transport_strength(model, tokenizer, text, r.concept) if transport else 1.0
                                 for r in runs]
                    with group.switched(enabled, strengths):
                        codes.append(spm.sample_prompts(model, tokenizer, [text], seeds, cfg, temperature)[0])
                return torch.stack(codes)

            records = evaluation.judge_records(draw, prompts, judge, args.n, base_codes)
            figures = pair_figures(records, args.pair, {t for r in runs for t in r.templates}, synonyms)
            print(json.dumps({"pair": list(args.pair), "overrides": overrides, "avoid": args.pair_avoid,
                              "stack": args.pair_stack, "seed": seed, "transport": transport,
                              "seconds": seconds, **figures}), flush=True)
        for membranes in group.sets:
            membranes.detach()


def pair_figures(records, pair, templates, synonyms):
    """Two erased objects' figures from judged records: the other objects kept, each object's rates and coherence, and
    each object drawn on the other's prompts (base and erased: created by the membranes where the base draws none)."""
    summary = evaluation.summarize(records, list(pair), [], toy.OBJECTS, templates, synonyms)
    figures = {"others_kept": summary[pair[0]]["others"]["retention"]}
    for obj, other in (pair, pair[::-1]):
        figures[obj] = {key: summary[obj][key] for key in ("trained_rate", "held_out_rate", "synonyms_rate",
                                                           "coherence")}
        theirs = [r for r in records if r["object"] == other]
        for side in ("base", "erased"):
            figures[obj][f"{side}_from_{other}_prompts"] = sum(r[side].get(obj, 0) for r in theirs) / sum(
                r["n"] for r in theirs)
    return figures


def setting_name(overrides):
    """A --quick setting as its flags (hold_out_objects and oracle_target, not flags of spm_janus.py, as words)."""
    flags = " ".join(f"`--{k.replace('_', '-')} {v}`" for k, v in overrides.items() if k not in (HOLD_OUT, ORACLE_TARGET))
    return (flags or "today's default") + (" (objects' words held out)" if overrides.get(HOLD_OUT) else "") + \
        (" (the oracle's distribution as the target)" if overrides.get(ORACLE_TARGET) else "")


def depth_table(args):
    """--depth: --quick's JSON lines as one row per setting and training seed (README's depth table), and the
    trade-off plot with the peers and the oracle."""
    rows = [json.loads(line) for path in args.depth for line in Path(path).read_text().splitlines() if line.strip()]
    if not rows:
        build_parser().error(f"--depth {' '.join(args.depth)}: no JSON lines; give files of --quick's output")
    settings = list(dict.fromkeys(setting_name(r["overrides"]) for r in rows))
    rows.sort(key=lambda r: (settings.index(setting_name(r["overrides"])), r["seed"]))
    pct = lambda v: f"{100 * v:.1f}"
    lines = ["| setting | training seed | mouse, trained / held-out / synonyms % | anchored kept % | non-anchored kept "
             "% (dog) | coherence % | soft ASR % at 10 / 30 / 100 / 300 steps | steps to 50% | train s |",
             "|---" * 9 + "|"]
    for r in rows:
        curve = " / ".join(f"{100 * r['curve'][b]:.0f}" for b in BUDGETS.split(","))
        lines.append(f"| {setting_name(r['overrides'])} | {r['seed']} | {pct(r['trained_rate'])} / "
                     f"{pct(r['held_out_rate'])} / {pct(r['synonyms_rate'])} | {pct(r['anchored_kept'])} | "
                     f"{pct(r['non_anchored_kept'])} ({pct(r['dog'])}) | {pct(r['coherence'])} | {curve} | "
                     f"{r['budget_50'] or 'never'} | {r['seconds']} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "depth.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    points = [(name.replace("`", ""), [(r["non_anchored_kept"], r["curve"]) for r in rows
                                       if setting_name(r["overrides"]) == name]) for name in settings]
    peers = {}  # label -> its seeds, over every --peer-results file
    for path in args.peer_results:
        for r in json.loads(Path(path).read_text())["results"]:
            if "today's default" not in r["setting"]:  # ours is a --quick row
                peers.setdefault(r["setting"].split(":")[0].split(" (")[0], []).extend(
                    (s["non_anchored_kept"], s["curve"]) for s in r["seeds"])
    points += list(peers.items())
    tradeoff_plot(points, out / "depth.png")
    print(f"wrote {out / 'depth.md'} and {out / 'depth.png'}", file=sys.stderr)


MARKERS = ("o", "[]", "<>", "^")  # past the plot's ten colours, the next settings take the next marker


def tradeoff_plot(points, path, budgets=("100", "300"), size=340):
    """A PNG, one panel per budget: the soft attack's ASR against non-anchored retention, one colour per setting
    (points: [(label, [(non_anchored_kept, curve), ...]), ...]); dashed, the targets (95% kept; 30% ASR at 300)."""
    from PIL import Image, ImageDraw
    colours = [(200, 30, 30), (30, 30, 200), (30, 150, 30), (200, 120, 0), (140, 0, 160), (0, 150, 160),
               (120, 120, 120), (90, 60, 20), (230, 0, 130), (0, 0, 0)]
    style = lambda i: (colours[i % len(colours)], MARKERS[i // len(colours) % len(MARKERS)])  # noqa: E731
    margin, low = 50, 0.5
    texts = [f"{style(i)[1]} {label}" for i, (label, _) in enumerate(points)]
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    legend = max([460] + [int(measure.textlength(t)) + 20 for t in texts])
    height = max(size + 2 * margin, 2 * margin + 16 * len(points))  # every legend row on the picture
    image = Image.new("RGB", (len(budgets) * (size + margin) + margin + legend, height), "white")
    draw = ImageDraw.Draw(image)
    for p, budget in enumerate(budgets):
        left, top = margin + p * (size + margin), margin
        x = lambda kept: left + size * (max(kept, low) - low) / (1 - low)  # noqa: E731
        y = lambda asr: top + size * (1 - asr)  # noqa: E731
        draw.rectangle([left, top, left + size, top + size], outline="black")
        draw.text((left, top - 30), f"soft attack ASR at {budget} Adam steps", fill="black")
        draw.text((left + size // 2 - 80, top + size + 22), "non-anchored objects kept", fill="black")
        for v in (low, 0.75, 0.95, 1.0):
            draw.text((x(v) - 10, top + size + 6), f"{v:.0%}", fill="black")
        for a in (0, 0.3, 0.5, 1):
            draw.text((left - 36, y(a) - 6), f"{a:.0%}", fill="black")
        for k in range(0, size, 8):  # the targets, dashed
            draw.line([x(0.95), top + k, x(0.95), top + k + 4], fill=(150, 150, 150))
            if budget == "300":
                draw.line([left + k, y(0.3), left + k + 4, y(0.3)], fill=(150, 150, 150))
        for i, (label, found) in enumerate(points):
            colour, shape = style(i)
            for kept, curve in found:
                px, py = x(kept), y(curve[budget])
                box = [px - 4, py - 4, px + 4, py + 4]
                if shape == "o":
                    draw.ellipse(box, outline=colour, width=2)
                elif shape == "[]":
                    draw.rectangle(box, outline=colour, width=2)
                elif shape == "<>":
                    draw.polygon([(px, py - 5), (px + 5, py), (px, py + 5), (px - 5, py)], outline=colour, width=2)
                else:
                    draw.polygon([(px, py - 5), (px + 5, py + 4), (px - 5, py + 4)], outline=colour, width=2)
    for i, text in enumerate(texts):
        draw.text((margin + len(budgets) * (size + margin), margin + 16 * i), text, fill=style(i)[0])
    image.save(path)


def concept_types(args):
    """The concept-type block: train every TYPES row with `--seeds` seeds, judge every prompt of its type."""
    model, tokenizer = spm.load_model("toy")
    cfg, temperature = spm.generation_defaults(model)
    seeds = list(range(args.eval_seed, args.eval_seed + args.n))
    settings = only(TYPES, args.only)
    if args.quick:  # the same rows with --quick's overrides on top, named by them
        extra = quick_overrides(args.quick, "--types")
        settings = [(f"{name}, {setting_name(extra)}" if extra else name, {**overrides, **extra})
                    for name, overrides in settings]

    def draw(erased, text_prompts):
        progress = tqdm(text_prompts, desc=f"{'erased' if erased else 'base'}: {args.n} pictures per prompt",
                        unit="prompt", leave=False, file=sys.stderr, dynamic_ncols=True)
        return torch.stack([spm.sample_prompts(model, tokenizer, [p], seeds, cfg, temperature)[0] for p in progress])

    base_codes, results, figure_rows = {}, [], []
    step0 = spm.sample_prompts(model, tokenizer, TYPE_FIGURE, [seeds[0]], cfg, temperature)[:, 0]
    for name, overrides in settings:
        kind = overrides["concept_type"]
        prompts = evaluation.eval_prompts(kind)
        judge, _, synonyms = evaluation.toy_judge("toy", kind)
        if kind not in base_codes:
            base_codes[kind] = draw(False, [p.prompt for p in prompts])
        per_seed = []
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            print(f"{name}, training seed {seed}", file=sys.stderr, flush=True)
            out = Path(args.runs) / f"{re.sub('[^a-z0-9]+', '-', name.lower()).strip('-')}-s{seed}"
            config = spm.Config(**{**overrides, "model": "toy", "seed": seed, "out": str(out), "sample_every": 0,
                                   "save_every": 0, **({"steps": args.steps} if args.steps else {})})
            started = time.time()
            run = spm.train(config, overwrite=True)
            seconds = time.time() - started
            membranes, _ = spm.load_membranes(out / spm.CHECKPOINT_NAME, model, tokenizer)
            records = evaluation.judge_records(draw, prompts, judge, args.n, base_codes[kind])
            summary = evaluation.summarize(records, run.concept, run.anchor_prompts or [], (), set(run.templates),
                                           synonyms, kind)[run.concept[0]]
            if seed == args.first_seed:
                figure_rows.append((name, spm.sample_prompts(model, tokenizer, TYPE_FIGURE, [seeds[0]], cfg,
                                                             temperature)[:, 0]))
            membranes.detach()
            flat = {key: (summary[key]["erased"] if isinstance(summary[key], dict) else summary[key])
                    for _, key in TYPE_COLUMNS if key in summary}
            per_seed.append({**flat, "seconds": seconds, "summary": summary})
            print(f"{name} seed {seed}: " + ", ".join(f"{k} {v if v is None else round(v, 3)}"
                                                     for k, v in flat.items()), flush=True)
        results.append({"setting": name, "settings": overrides, "seeds": per_seed})
    lines = [f"{args.n} samples per prompt (evaluation seeds from {args.eval_seed}), {args.seeds} training seed(s) per "
             f"setting (mean ± std over seeds; the seeds one by one in ablation.json).", "",
             "| setting | " + " | ".join(c for c, _ in TYPE_COLUMNS) + " |", "|---" * (len(TYPE_COLUMNS) + 1) + "|"]
    for r in results:
        lines.append(f"| {r['setting']} | " + " | ".join(
            cell(r["seeds"], key, 1 if key in ("H", "seconds") else 100, 3 if key == "H" else 0 if key == "seconds"
                 else 1) for _, key in TYPE_COLUMNS) + " |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablation.md").write_text("\n".join(lines) + "\n")
    (out / "ablation.json").write_text(json.dumps({"results": results, "n": args.n, "seeds": args.seeds}, indent=1))
    rows = [spm.decode_images(model, step0)] + [spm.decode_images(model, codes) for _, codes in figure_rows]
    labels = ["base model"] + [name for name, _ in figure_rows]
    spm.image_grid(rows, labels, TYPE_FIGURE, cell=64, label_width=6 * max(map(len, labels)) + 12).save(
        out / "ablation.png")
    print("\n".join(lines))
    print(f"wrote {out / 'ablation.md'}, {out / 'ablation.json'}, {out / 'ablation.png'}")


if __name__ == "__main__":
    main()
