"""
The poster's ablation table, reproduced on the toy Janus: erase "mouse" with each setting at one step budget, then
judge every sample.

    python ablate.py                       # all settings x 3 seeds -> ablation.md, ablation.json, ablation.png

Each setting trains with spm_janus.py's own train() (in this process), then samples every toy prompt
(objects x templates) with the same seeds and judges the pictures exactly.
"""
import json
import re
import statistics
import time
from pathlib import Path

import torch

import sample
import spm_janus as spm
import toy_janus as toy

# (name, flags). The poster's membranes acted on the image positions and trained without anchoring, so its settings
# get --scope image --anchor none; the anchoring rows add it back, and the last row is spm_janus.py's defaults.
SETTINGS = [
    ("MSE/MLP (all)", ["--loss", "mse", "--layers", "mlp", "--scope", "image", "--anchor", "none"]),
    ("MSE/Attn", ["--loss", "mse", "--layers", "attn", "--scope", "image", "--anchor", "none"]),
    ("KL/Attn", ["--loss", "kl", "--layers", "attn", "--scope", "image", "--anchor", "none"]),
    ("KL/Attn, scope prompt", ["--loss", "kl", "--layers", "attn", "--scope", "prompt", "--anchor", "none"]),
    ("KL/Attn, scope all (+text encoder)", ["--loss", "kl", "--layers", "attn", "--scope", "all", "--anchor", "none"]),
    ("KL/Attn+MLP (all)", ["--loss", "kl", "--layers", "attn+mlp", "--scope", "image", "--anchor", "none"]),
    # The toy has 2 decoder layers, so "7 modules" is read as the 7 projections (q,k,v,o,gate,up,down) of layer 0.
    ("KL/Attn+MLP (7 modules)", ["--loss", "kl", "--layers", "attn+mlp", "--attn-layer-ids", "0",
                                 "--mlp-layer-ids", "0", "--scope", "image", "--anchor", "none"]),
    ("KL/Attn, substitute 'real mouse'", ["--loss", "kl", "--layers", "attn", "--surrogate", "real mouse",
                                          "--scope", "image", "--anchor", "none"]),
    ("KL/Attn + latent anchoring", ["--loss", "kl", "--layers", "attn", "--scope", "image", "--anchor", "latent"]),
    ("KL/Attn + prompt anchoring", ["--loss", "kl", "--layers", "attn", "--scope", "image"]),
    ("KL/Attn, scope prompt + prompt anchoring (default)", ["--loss", "kl", "--layers", "attn"]),
]


def rates(codes, prompts, target):
    """Share of samples judged as the prompted object: target trained / held-out templates, and the others."""
    hits = {"trained": [], "held_out": [], "others": []}
    for (prompt, obj, held_out), row in zip(prompts, codes):
        correct = sum(label == obj for label, _ in toy.judge_batch(row)) / len(row)
        hits["others" if obj != target else ("held_out" if held_out else "trained")].append(correct)
    return {k: statistics.mean(v) for k, v in hits.items()}


def main():
    parser = spm.OneLineParser(prog="ablate.py", description="Reproduce the poster's ablations on the toy Janus.")
    parser.add_argument("--steps", type=int, default=None, help="erasure steps per run (default: spm_janus.py's)")
    parser.add_argument("--seeds", type=int, default=3, help="training seeds per setting")
    parser.add_argument("--n", type=int, default=32, help="samples per evaluation prompt")
    parser.add_argument("--only", action="append", default=None, help="run only settings whose name contains this")
    parser.add_argument("--out", default="ablation", help="prefix of the .md, .json and .png outputs")
    parser.add_argument("--runs", default="runs/ablation", help="directory for the runs' checkpoints")
    args = parser.parse_args()
    torch.set_num_threads(1)
    settings = [s for s in SETTINGS if not args.only or any(o in s[0] for o in args.only)]

    model, tokenizer = spm.load_model("toy")
    cfg, temperature = spm.generation_defaults(model)
    seeds = list(range(1000, 1000 + args.n))  # evaluation seeds, unused in training
    prompts = sample.eval_prompts(set(spm.DEFAULT_TEMPLATES))

    def draw(text_prompts):
        return torch.stack([spm.sample_prompts(model, tokenizer, [p], seeds, cfg, temperature)[0] for p in text_prompts])

    base = rates(draw([p for p, _, _ in prompts]), prompts, "mouse")
    figure_prompts = ["a mouse", "a cat"]
    figure_columns, figure_cells = [], {p: [] for p in figure_prompts}
    step0 = spm.sample_prompts(model, tokenizer, figure_prompts, [seeds[0]], cfg, temperature)[:, 0]
    results = []
    for name, flags in settings:
        per_seed = []
        for seed in range(args.seeds):
            out = Path(args.runs) / f"{re.sub('[^a-z0-9]+', '-', name.lower()).strip('-')}-s{seed}"
            argv = ["--model", "toy", "--concept", "mouse", *flags, "--seed", str(seed), "--out", str(out),
                    "--overwrite", "--sample-every", "0", "--save-every", "0"]
            argv += ["--steps", str(args.steps)] if args.steps else []
            started = time.time()
            spm.train(spm.build_parser().parse_args(argv))
            seconds = time.time() - started
            membranes, _ = spm.load_membranes(out / spm.CHECKPOINT_NAME, model, tokenizer)
            measured = rates(draw([p for p, _, _ in prompts]), prompts, "mouse")
            pictures = spm.decode_images(model, spm.sample_prompts(model, tokenizer, ["a cat", "a car"], seeds[:4], cfg,
                                                                   temperature).flatten(0, 1))
            drift_image = spm.understanding_drift(model, tokenizer, membranes, ["is there a mouse ?"] * 8, pictures)
            drift_text = spm.understanding_drift(model, tokenizer, membranes, [p for p, _, _ in prompts[::4]])
            if seed == 0:
                figure_columns.append(name)
                last = spm.sample_prompts(model, tokenizer, figure_prompts, [seeds[0]], cfg, temperature)[:, 0]
                for p, codes in zip(figure_prompts, last):
                    figure_cells[p].append(codes)
            membranes.detach()
            per_seed.append({**measured, "seconds": seconds, "understanding_kl_image": drift_image["kl"],
                             "understanding_kl_text": drift_text["kl"]})
            print(f"{name} seed {seed}: mouse {measured['trained']:.1%} trained / {measured['held_out']:.1%} held-out, "
                  f"others {measured['others']:.1%} (base {base['others']:.1%}), {seconds:.0f} s", flush=True)
        results.append({"setting": name, "flags": flags, "seeds": per_seed})

    def cell(rows, key, scale=100.0, digits=1):
        values = [r[key] * scale for r in rows]
        spread = f" ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else ""
        return f"{statistics.mean(values):.{digits}f}{spread}"

    lines = [f"Base model: mouse {100 * base['trained']:.1f}% (trained templates) / {100 * base['held_out']:.1f}% "
             f"(held-out templates); other objects {100 * base['others']:.1f}% correct. {args.n} samples per prompt, "
             f"{len(prompts)} prompts, {args.seeds} seed(s) per setting (mean ± std over seeds).", "",
             "| setting | mouse, trained templates % | mouse, held-out templates % | others correct % | retention | "
             "understanding KL, image / text | train s |", "|---|---|---|---|---|---|---|"]
    for r in results:
        rows = r["seeds"]
        retention = [x["others"] / base["others"] for x in rows]
        spread = f" ± {statistics.stdev(retention):.2f}" if len(retention) > 1 else ""
        lines.append(f"| {r['setting']} | {cell(rows, 'trained')} | {cell(rows, 'held_out')} | {cell(rows, 'others')} | "
                     f"{statistics.mean(retention):.2f}{spread} | {cell(rows, 'understanding_kl_image', 1, 3)} / "
                     f"{cell(rows, 'understanding_kl_text', 1, 3)} | {cell(rows, 'seconds', 1, 0)} |")
    Path(f"{args.out}.md").write_text("\n".join(lines) + "\n")
    Path(f"{args.out}.json").write_text(json.dumps({"base": base, "results": results}, indent=1))
    rows = [spm.decode_images(model, torch.stack([step0[i]] * len(figure_columns))) for i in range(2)]
    rows += [spm.decode_images(model, torch.stack(figure_cells[p])) for p in figure_prompts]
    labels = [f"{p}, step 0" for p in figure_prompts] + [f"{p}, last step" for p in figure_prompts]
    spm.image_grid(rows, labels, [c[:24] for c in figure_columns], cell=96).save(f"{args.out}.png")
    print("\n".join(lines))
    print(f"wrote {args.out}.md, {args.out}.json, {args.out}.png")


if __name__ == "__main__":
    main()
