"""
A toy world in which concept erasure can be seen and measured on a CPU.

Eight pictograms (mouse, cat, dog, ...) in four colours on an 8x8 grid of image codes. Every object is named by
its word or by either of two synonyms ("mouse", "rodent", "vole"), all drawing the same pictogram. build() trains a
small, real JanusForConditionalGeneration to draw them from text prompts, and its VQ decoder to paint every code as a
coloured 4x4 patch, so decode_image_tokens() shows the pictures. judge() reads a grid of codes back as
(object, colour); the object is "blank" for a canvas with (almost) no ink and "none" for a picture that is no clean
pictogram.

    python toy_janus.py            # rebuild toy_model/ next to this file (a few minutes on 2 cores)
    python toy_janus.py --check    # per-object quality table of the existing checkpoint

It does no work at import time.
"""
import functools
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import spm_janus

OBJECTS = ("mouse", "cat", "dog", "bird", "fish", "car", "tree", "house")
# Two more words for every object, drawing its pictogram: an erasure trained on "mouse" alone is asked about them
# (generality). No word is shared between objects, colours and styles.
SYNONYMS = {"mouse": ("rodent", "vole"), "cat": ("kitten", "kitty"), "dog": ("puppy", "hound"),
            "bird": ("sparrow", "robin"), "fish": ("trout", "salmon"), "car": ("automobile", "sedan"),
            "tree": ("oak", "pine"), "house": ("cottage", "home")}
COLORS = ("red", "green", "blue", "yellow")
COLOR_SYNONYMS = {"red": ("crimson", "scarlet"), "green": ("emerald", "olive"), "blue": ("azure", "navy"),
                  "yellow": ("golden", "amber")}
# How a pictogram is drawn, the default first: in its full colour, in a pastel tint of it, or shaded dark. The
# object and the colour stay what they are; a prompt that names no style draws a solid pictogram. A style is a tone
# of the whole pictogram, not a texture: the VQ decoder paints every code as one flat patch, and patterns of full and
# pale cells (stripes, a checkerboard) were drawn right only 40-70% of the time after the usual training.
STYLES = ("solid", "pastel", "shaded")
STYLE_SYNONYMS = {"solid": ("filled", "plain"), "pastel": ("faded", "pale"), "shaded": ("shadowed", "dusky")}
# Words that may stand before the object in a prompt without changing the picture: a substitute surrogate such as
# "real mouse" then means a mouse picture.
MODIFIERS = ("real", "small", "big")
# The erasure trainer's default templates come first: erasure is trained on them, so the model must know them.
TEMPLATES = tuple(t.replace("{}", "{object}") for t in spm_janus.DEFAULT_TEMPLATES) + (
    "a drawing of a {object}", "a {color} {object}", "a photo of a {color} {object}", "a drawing of a {color} {object}")
HELD_OUT_TEMPLATES = tuple(t for t in TEMPLATES if t.replace("{object}", "{}") not in spm_janus.DEFAULT_TEMPLATES)
EVAL_TEMPLATES = TEMPLATES  # the object erasure's evaluation, as in toy world v2
STYLE_TEMPLATES = ("a {style} {object}", "a photo of a {style} {object}", "a picture of a {style} {object}",
                   "an image of a {style} {object}", "a drawing of a {style} {object}", "a {style} {color} {object}",
                   "a drawing of a {style} {color} {object}")
ALL_TEMPLATES = TEMPLATES + STYLE_TEMPLATES  # what the base model is trained on

GRID, PATCH, CODEBOOK = 8, 4, 16  # N = GRID * GRID image tokens; each code is a PATCH x PATCH pixel patch
# Code 0 is the background; code code_of(colour, style) = 1 + len(COLORS) * STYLES.index(style) + COLORS.index(colour)
# draws an ink cell (1-4: the solid colours of toy world v2); the codes above them are never drawn.
BACKGROUND = 0
FULL_RGB = ((0.85, 0.1, 0.1), (0.1, 0.65, 0.15), (0.1, 0.25, 0.9), (0.95, 0.75, 0.0))
TONES = {"solid": lambda c: c, "pastel": lambda c: c + (1 - c) * 0.6, "shaded": lambda c: c * 0.45}
# RGB in [0, 1] of every code. Unused codes are black so that a broken picture looks broken.
PALETTE = ((1.0, 1.0, 1.0),) + tuple(tuple(round(TONES[s](c), 4) for c in rgb) for s in STYLES for rgb in FULL_RGB) + \
    ((0.0, 0.0, 0.0),) * (CODEBOOK - 1 - len(STYLES) * len(COLORS))
SHIFTS = ((0, 0), (0, 1), (1, 0), (1, 1))  # a 7x7 pictogram moves by up to one cell on the 8x8 grid
# The closest two pictograms (any placements) differ in 12 cells, so a picture within 4 cells of one
# pictogram is within 4 of no other: the judge's answer is unique.
MAX_MISMATCH = 4
BLANK_INK = 4  # at most this many ink cells: "blank" (the smallest pictogram, bird, has 14)
COLOR_SHARE = 0.8  # a picture has a colour (a style) if at least this share of its ink is that colour (style)
SHAPES = {
    "mouse": ["##...##", "##...##", ".#####.", ".#.#.#.", ".#####.", "..###..", "...#..."],
    "cat": ["#.....#", "##...##", "#######", "#.#.#.#", "#######", "#.###.#", ".#####."],
    "dog": ["##.....", "###....", "#######", ".######", ".#####.", ".#...#.", ".#...#."],
    "bird": [".......", "#.....#", "##...##", ".##.##.", "..###..", "...#...", "......."],
    "fish": [".......", ".###..#", "#####.#", "#.#####", "#####.#", ".###..#", "......."],
    "car": [".......", "..###..", ".#...#.", "#######", "#######", ".#...#.", "......."],
    "tree": ["...#...", "..###..", ".#####.", "#######", "...#...", "...#...", "...#..."],
    "house": ["...#...", "..#.#..", ".#...#.", "#######", ".#.#.#.", ".#.#.#.", ".#####."],
}
# Share of training prompts replaced by the all-pad prompt: CFG needs an unconditional branch. At 10% it stayed
# incoherent within the time budget (its samples were no pictograms) and CFG broke the conditional pictures.
P_UNCONDITIONAL = 0.25
P_MODIFIER = 0.2  # share of training prompts with a modifier word before the object
# Shares of training prompts that name the colour and the style. Only the first ink token learns them from the
# prompt (later ones copy them), so they are the scarce signal: half the prompts each.
P_COLOR_TEMPLATE, P_STYLE_TEMPLATE = 0.6, 0.6
LABEL_SMOOTHING = 0.03  # keeps CFG from amplifying codes the model thinks impossible
GUIDANCE_SCALE, TEMPERATURE = 2.0, 0.5  # the model's sampling defaults; at CFG 3 some objects fell to 90%


# -----------------------------------------------------------------------------
# Pictures and the judge


@functools.cache
def _mask(obj):
    return torch.tensor([[c == "#" for c in row] for row in SHAPES[obj]])


def code_of(color, style="solid"):
    return 1 + len(COLORS) * STYLES.index(style) + COLORS.index(color)


def render(obj, color, shift=(0, 0), style="solid"):
    """Codes [N] of `obj` drawn in `color` and `style`, its 7x7 pictogram moved by shift=(dy, dx) cells."""
    grid = torch.full((GRID, GRID), BACKGROUND, dtype=torch.long)
    dy, dx = shift
    grid[dy:dy + 7, dx:dx + 7][_mask(obj)] = code_of(color, style)
    return grid.flatten()


@functools.cache
def _placements():
    """Ink masks [len(OBJECTS) * len(SHIFTS), N] of every pictogram at every shift."""
    return torch.stack([render(o, COLORS[0], s) != BACKGROUND for o in OBJECTS for s in SHIFTS])


def judge_batch(codes):
    """Codes [B, N] -> [(object, colour, style)]: the pictogram within MAX_MISMATCH cells of the ink ('blank' for at
    most BLANK_INK ink cells, else 'none'), and the colour and the style of at least COLOR_SHARE of the ink each
    ('none' where no one has that share, and the style of no clean pictogram)."""
    codes = codes.reshape(-1, GRID * GRID).cpu()
    ink = codes != BACKGROUND
    mismatch = (ink[:, None] != _placements()[None]).sum(-1)  # [B, objects * shifts]
    best, index = mismatch.min(1)
    drawn = torch.stack([codes == code_of(c, s) for s in STYLES for c in COLORS], 1).view(
        -1, len(STYLES), len(COLORS), GRID * GRID).sum(-1)  # [B, styles, colours]: ink cells of each code
    top_color, color_index = drawn.sum(1).max(1)
    top_style, style_index = drawn.sum(2).max(1)
    results = []
    for b in range(codes.shape[0]):
        obj = OBJECTS[index[b] // len(SHIFTS)] if best[b] <= MAX_MISMATCH else "none"
        if ink[b].sum() <= BLANK_INK:
            obj = "blank"
        share = COLOR_SHARE * ink[b].sum()
        color = COLORS[color_index[b]] if 0 < top_color[b] >= share else "none"
        style = STYLES[style_index[b]] if obj not in ("none", "blank") and 0 < top_style[b] >= share else "none"
        results.append((obj, color, style))
    return results


def judge(codes):
    """Codes [N] -> (object, colour, style), each 'none' (the object 'blank' too) where there is no clean answer."""
    return judge_batch(codes[None])[0]


def palette_pixels(codes):
    """Codes [B, N] -> the pixels [B, 3, H, W] in [-1, 1] the VQ decoder should produce."""
    rgb = torch.tensor(PALETTE)[codes] * 2 - 1  # [B, N, 3]
    rgb = rgb.view(-1, GRID, GRID, 3).permute(0, 3, 1, 2)
    return rgb.repeat_interleave(PATCH, 2).repeat_interleave(PATCH, 3)


# -----------------------------------------------------------------------------
# Prompts and the model


def make_prompt(template, obj, color, modifier=None, style="solid"):
    """The prompt; a modifier goes before the colour if the template names one, else before the style, else before
    the object."""
    if modifier and "{color}" in template:
        color = f"{modifier} {color}"
    elif modifier and "{style}" in template:
        style = f"{modifier} {style}"
    elif modifier:
        obj = f"{modifier} {obj}"
    return template.format(object=obj, color=color, style=style)


def words_for(obj):
    """The words that name obj: the object word first, then its synonyms."""
    return (obj,) + SYNONYMS[obj]


def color_words(color):
    return (color,) + COLOR_SYNONYMS[color]


def style_words(style):
    return (style,) + STYLE_SYNONYMS[style]


def object_of(word):
    """The object a word names (an object word or a synonym), or None."""
    return next((o for o in OBJECTS if word in words_for(o)), None)


def meaning(word):
    """(kind, value) of a word of the world: ('object', 'mouse') for 'vole', ('color', 'red') for 'crimson',
    ('style', 'striped') for 'banded'; None for any other word."""
    for kind, values, words in (("object", OBJECTS, words_for), ("color", COLORS, color_words),
                                ("style", STYLES, style_words)):
        for value in values:
            if word in words(value):
                return kind, value
    return None


def vocabulary():
    words = {w for t in ALL_TEMPLATES for w in t.split() if "{" not in w}
    return sorted(words | {w for o in OBJECTS for w in words_for(o)} | {w for c in COLORS for w in color_words(c)}
                  | {w for s in STYLES for w in style_words(s)} | set(MODIFIERS))


def new_model(seed=0, hidden=64, layers=2, heads=8):
    """A freshly initialised toy Janus and its tokenizer. 8 heads of 8 rather than 4 of 16: the model needs many
    attention patterns (cell to the left, cell above, <begin_of_image>, object and colour words), and after 300
    steps 8 heads had a third less loss per picture than 4."""
    from transformers import JanusForConditionalGeneration

    tokenizer = spm_janus.word_tokenizer(vocabulary())
    config = spm_janus.janus_config(len(tokenizer), hidden=hidden, intermediate=2 * hidden, layers=layers, heads=heads,
                                    grid=GRID, patch=PATCH, codebook=CODEBOOK,
                                    image_token_id=tokenizer.convert_tokens_to_ids("<image_placeholder>"))
    torch.manual_seed(seed)
    model = JanusForConditionalGeneration(config)
    # At the default init (std 0.02) the image-code embeddings vanish next to the aligner's biases, and the model
    # takes long to tell the codes apart, so it cannot copy a colour between image tokens: give them unit scale.
    torch.nn.init.normal_(model.model.generation_embeddings.weight, std=1.0)
    spm_janus.set_generation_defaults(model, tokenizer, GUIDANCE_SCALE, TEMPERATURE)
    return model.eval(), tokenizer  # no dropout anywhere; eval() is how it is used


def training_batch(generator, batch_size, without=None):
    """(prompts, codes [B, N]): random objects, colours, styles and shifts, each named by a random one of its words,
    in random templates, some with a modifier. without: an object, colour or style never drawn nor named (the
    oracle: the world as if that concept had never been seen)."""
    def pick(choices):
        return choices[int(torch.randint(len(choices), (), generator=generator))]

    objects, colors, styles = ([v for v in values if v != without] for values in (OBJECTS, COLORS, STYLES))
    prompts, codes = [], []
    for _ in range(batch_size):
        colored = torch.rand((), generator=generator) < P_COLOR_TEMPLATE
        styled = torch.rand((), generator=generator) < P_STYLE_TEMPLATE
        template = pick([t for t in ALL_TEMPLATES if ("{color}" in t) == colored and ("{style}" in t) == styled])
        obj, color, shift = pick(objects), pick(colors), pick(SHIFTS)
        style = pick(styles) if styled else STYLES[0]
        modifier = pick(MODIFIERS) if torch.rand((), generator=generator) < P_MODIFIER else None
        prompts.append(make_prompt(template, pick(words_for(obj)), pick(color_words(color)), modifier,
                                   pick(style_words(style))))
        codes.append(render(obj, color, shift, style))
    return prompts, torch.stack(codes)


def cosine_lr(step, steps, lr, warmup):
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def train_generator(model, tokenizer, steps, batch_size=64, lr=3e-3, seed=0, log_every=100, without=None):
    """Teacher-forced text -> image-code training with exactly the prompt layout and pass the sampler uses."""
    m = model.model
    params = [p for mod in (m.language_model, m.generation_embeddings, m.generation_aligner, m.generation_head)
              for p in mod.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(seed)
    embed = model.get_input_embeddings()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, steps, lr, warmup=steps // 20)
        prompts, codes = training_batch(generator, batch_size, without)
        input_ids, mask = spm_janus.encode_prompts(tokenizer, prompts)
        # The unconditional prompt exactly as CFG builds it at sampling time (same length and mask).
        drop = torch.rand(batch_size, generator=generator) < P_UNCONDITIONAL
        input_ids = torch.where(drop[:, None], spm_janus.unconditional_ids(input_ids, tokenizer), input_ids)
        logits = spm_janus.image_logits(model, embed(input_ids), mask, codes)
        loss = F.cross_entropy(logits.flatten(0, 1), codes.flatten(), label_smoothing=LABEL_SMOOTHING)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"generator step {step:4d} loss {loss.item():.4f}", flush=True)


def init_decoder(vq):
    """Start the VQ decoder as nearest-neighbour upsampling of each code's feature vector: residual branches and
    attention outputs zeroed, the other convolutions identities. From there a few hundred steps learn the colours;
    from the random init it took thousands."""
    from transformers.models.janus.modeling_janus import (JanusVQVAEAttnBlock, JanusVQVAEConvUpsample,
                                                          JanusVQVAEResnetBlock)

    def identity(conv):
        conv.weight.zero_()
        conv.bias.zero_()
        n, k = min(conv.weight.shape[:2]), conv.weight.shape[-1] // 2
        conv.weight[range(n), range(n), k, k] = 1.0

    with torch.no_grad():
        identity(vq.decoder.conv_in)
        for module in vq.decoder.modules():
            if isinstance(module, JanusVQVAEResnetBlock):
                module.conv2.weight.zero_()
                module.conv2.bias.zero_()
                if module.in_channels != module.out_channels:
                    identity(module.nin_shortcut)
            elif isinstance(module, JanusVQVAEAttnBlock):
                module.proj_out.weight.zero_()
                module.proj_out.bias.zero_()
            elif isinstance(module, JanusVQVAEConvUpsample):
                identity(module.conv)
        torch.nn.init.normal_(vq.quantize.embedding.weight)  # distinct code vectors from the start


def decoder_batch(generator, batch_size, without=None):
    """Renders, half of them with up to 30% of the cells replaced by random codes (erasure makes broken pictures,
    and those should be painted faithfully too), and one blank picture."""
    codes = training_batch(generator, batch_size, without)[1]
    share = torch.rand(batch_size, 1, generator=generator) * 0.3 * (torch.arange(batch_size)[:, None] % 2)
    noise = torch.randint(CODEBOOK, codes.shape, generator=generator)
    codes = torch.where(torch.rand(codes.shape, generator=generator) < share, noise, codes)
    codes[0] = BACKGROUND
    return codes


def train_decoder(model, steps, batch_size=8, lr=3e-3, seed=0, log_every=100, without=None):
    """Teach the VQ decoder to paint each code as its PALETTE patch (pixel MSE). The decoder's GroupNorms make every
    pixel depend a little on the whole picture, so it is trained on the kind of pictures it will be shown."""
    vq = model.model.vqmodel
    init_decoder(vq)
    params = [p for mod in (vq.quantize, vq.post_quant_conv, vq.decoder) for p in mod.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed + 1)
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, steps, lr, warmup=steps // 20)
        codes = decoder_batch(generator, batch_size, without)
        loss = F.mse_loss(vq.decode(codes), palette_pixels(codes))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"decoder step {step:4d} mse {loss.item():.5f}", flush=True)
    return loss.item()


def build(out_dir=None, seed=0, steps=2400, decoder_steps=400, batch_size=64, lr=3e-3, threads=1, without=None):
    """Train the toy model from scratch and save it, with its tokenizer, to out_dir (default: where
    spm_janus.load_model("toy") looks). without: an object, colour or style (not solid) left out of every training
    prompt and picture, the same recipe and seeds otherwise: the oracle of unlearning. Returns (model, tokenizer)."""
    torch.set_num_threads(threads)  # 1 thread was as fast as 2 here, and stays fast when the CPU is shared
    started = time.time()
    model, tokenizer = new_model(seed)
    model.config.toy_world = {"version": 3, "without": without}  # the judge knows the toy and its oracles by it
    train_generator(model, tokenizer, steps, batch_size, lr, seed, without=without)
    print(f"generator trained in {time.time() - started:.0f} s", flush=True)
    mse = train_decoder(model, decoder_steps, seed=seed, without=without)
    print(f"decoder pixel MSE {mse:.5f}; built in {time.time() - started:.0f} s", flush=True)
    out_dir = Path(out_dir or spm_janus.toy_model_dir())
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return model, tokenizer


# -----------------------------------------------------------------------------
# Quality


def quality_prompts(word):
    """[(prompt, (object, colour or None, style))] through `word`: an object word in toy world v2's templates, once
    per colour a template names; a colour word in every template that names a colour, with every object (and style);
    a style word in every style template, with every object (and colour). None: the colour is the model's choice."""
    kind, value = meaning(word)
    if kind == "object":
        return [(make_prompt(t, word, c), (value, c if "{color}" in t else None, "solid"))
                for t in EVAL_TEMPLATES for c in (COLORS if "{color}" in t else COLORS[:1])]
    if kind == "color":
        return [(make_prompt(t, o, word, style=s), (o, value, s)) for t in ALL_TEMPLATES if "{color}" in t
                for o in OBJECTS for s in (STYLES if "{style}" in t else STYLES[:1])]
    return [(make_prompt(t, o, c, style=word), (o, c if "{color}" in t else None, value)) for t in STYLE_TEMPLATES
            for o in OBJECTS for c in (COLORS if "{color}" in t else COLORS[:1])]


def base_quality(model, tokenizer, n=128, seed=1000, without=None):
    """{word: {kind, value, object_acc, color_acc, style_acc, none, blank, n, n_color}} for every word of the world
    (objects, colours, styles and their synonyms), from at least n samples per word, at the model's CFG and
    temperature, with seeds from `seed` on (training is teacher-forced and samples nothing, so every seed is unseen).
    color_acc counts the prompts that name a colour; style_acc all of them (no style named: solid); none and blank
    are the shares of objects judged so. without (an oracle's concept): the other words' prompts leave it out."""
    from tqdm import tqdm

    cfg, temperature = spm_janus.generation_defaults(model)
    words = [w for o in OBJECTS for w in words_for(o)] + [w for c in COLORS for w in color_words(c)] + \
        [w for s in STYLES for w in style_words(s)]
    results = {}
    for word in tqdm(words, desc="sampling every word of the world", unit="word", leave=False, file=sys.stderr,
                     dynamic_ncols=True):
        kind, value = meaning(word)
        prompts = [(p, e) for p, e in quality_prompts(word) if value == without or without not in e]
        seeds = list(range(seed, seed + math.ceil(n / len(prompts))))
        codes = spm_janus.sample_prompts(model, tokenizer, [p for p, _ in prompts], seeds, cfg, temperature)
        verdicts = judge_batch(codes.flatten(0, 1))
        expected = [e for _, e in prompts for _ in seeds]
        colored = [(v, e) for v, e in zip(verdicts, expected) if e[1] is not None]
        results[word] = {"kind": kind, "value": value, "n": len(verdicts), "n_color": len(colored),
                         "object_acc": sum(v[0] == e[0] for v, e in zip(verdicts, expected)) / len(verdicts),
                         "color_acc": sum(v[1] == e[1] for v, e in colored) / len(colored),
                         "style_acc": sum(v[2] == e[2] for v, e in zip(verdicts, expected)) / len(verdicts),
                         "none": sum(v[0] == "none" for v in verdicts) / len(verdicts),
                         "blank": sum(v[0] == "blank" for v in verdicts) / len(verdicts)}
    return results


def quality_table(results, without=None):
    head = f"{'word':11s} {'means':16s} {'object_acc':>10s} {'color_acc':>9s} {'style_acc':>9s} {'none':>6s} " \
           f"{'blank':>6s} {'n':>4s} {'n_color':>7s}"
    lines = [head]
    for word, r in results.items():
        lines.append(f"{word:11s} {r['kind'] + ' ' + r['value']:16s} {r['object_acc']:10.3f} {r['color_acc']:9.3f} "
                     f"{r['style_acc']:9.3f} {r['none']:6.3f} {r['blank']:6.3f} {r['n']:4d} {r['n_color']:7d}")
    kept = {w: r for w, r in results.items() if r["value"] != without}
    for figure in ("object_acc", "color_acc", "style_acc"):
        worst = min(kept, key=lambda w: kept[w][figure])
        lines.append(f"lowest {figure}{' (every other word)' if without else ''}: {worst} {kept[worst][figure]:.3f}")
    if without:  # what its own words draw: the acc of its part is how often the oracle draws it anyway
        part = {"object": "object_acc", "color": "color_acc", "style": "style_acc"}[meaning(without)[0]]
        mine = {w: r for w, r in results.items() if r["value"] == without}
        drawn = sum(r[part] * r["n" if part != "color_acc" else "n_color"] for r in mine.values()) / \
            sum(r["n" if part != "color_acc" else "n_color"] for r in mine.values())
        lines.append(f"without {without}: its words ({', '.join(mine)}) draw {without} in {drawn:.1%} of their "
                     f"pictures (the oracle never saw it)")
    return "\n".join(lines)


def write_grid(path, model, tokenizer, seeds=range(1000, 1008)):
    """A PNG of decoded samples: one row per object ('a {object}'), one column per seed."""
    cfg, temperature = spm_janus.generation_defaults(model)
    spm_janus.write_sample_grid(path, model, tokenizer, [f"a {o}" for o in OBJECTS], list(seeds), cfg, temperature,
                                f"cfg {cfg} t {temperature}")


def main(argv=None):
    parser = spm_janus.OneLineParser(prog="toy_janus.py",
                                     description="Build (or check) the toy Janus model of synthetic pictograms.")
    parser.add_argument("--out", default=None, help="checkpoint directory to write (or read with --check; default: "
                                                    "toy_model/ next to this file, toy_model_without_<concept>/ with "
                                                    "--without)")
    parser.add_argument("--without", default=None,
                        help="build the oracle: the same recipe and seeds without every training prompt and picture of "
                             "this object, colour or style (not solid, the default) and its synonyms")
    parser.add_argument("--seed", type=int, default=0, help="seed of initialisation and training data")
    parser.add_argument("--steps", type=int, default=2400, help="generator (LLM) training steps")
    parser.add_argument("--decoder-steps", type=int, default=400, help="VQ decoder training steps")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--check", action="store_true", help="only print the base-quality table of --out")
    parser.add_argument("--samples", type=int, default=128, help="at least this many quality samples per word")
    parser.add_argument("--grid", default=None, help="also write a PNG of decoded samples per object to this path")
    args = parser.parse_args(argv)
    if args.without is not None:
        found = meaning(args.without)
        if found is None or found[1] == STYLES[0]:
            parser.error(f"--without {args.without!r} is no object, colour or style of the toy world but solid: "
                         f"choose one of {', '.join(OBJECTS + COLORS + STYLES[1:])} (or a synonym)")
        args.without = found[1]
    args.out = args.out or str(spm_janus.toy_model_dir().with_name(
        f"toy_model_without_{args.without}" if args.without else "toy_model"))
    for flag, value, least in (("--steps", args.steps, 1), ("--decoder-steps", args.decoder_steps, 1),
                               ("--threads", args.threads, 1), ("--samples", args.samples, 1)):
        if value < least:
            parser.error(f"{flag} {value} must be at least {least}")
    if args.check:
        torch.set_num_threads(args.threads)
        try:
            model, tokenizer = spm_janus.load_model(args.out)
        except spm_janus.SPMError as e:
            parser.exit(e.exit_code, f"toy_janus.py: error: {e}\n")
    else:
        model, tokenizer = build(args.out, args.seed, args.steps, args.decoder_steps, threads=args.threads,
                                 without=args.without)
    started = time.time()
    without = args.without or (getattr(model.config, "toy_world", None) or {}).get("without")
    print(quality_table(base_quality(model, tokenizer, args.samples, without=without), without))
    print(f"sampled and judged in {time.time() - started:.1f} s")
    if args.grid:
        write_grid(args.grid, model, tokenizer)
        print(f"wrote {args.grid}")


if __name__ == "__main__":
    main()
