"""
Benchmarks of spm-janus. Both sides of every comparison run in this process, in alternated order, after a warm-up:

train    a training step as ONE teacher-forced pass (spm_janus.image_logits, KL to the erasure target, backward over
         all N image tokens) against the same loss built the way peers train: N forward passes of one token with a
         KV cache and the graph kept, then one backward. Loss agreement, wall time, allocator-level peak memory.
sample   sampling the same seeds with unmerged rank-1 membranes (attn; attn+mlp) and with merged ones (scope all)
         against the base model with none attached (merged tokens must be bit-identical to unmerged ones); and CFG
         as two passes per step against spm_janus.sample_codes' one doubled batch. One shared set of rounds.
teacher  the teacher's concept and surrogate logits in one batched no-grad pass against two passes.
memory   whole-process peak of a real training step (spm_janus.Trainer) against a plain sampling pass of as many
         rows: the teacher is the same model with membranes off, never a second copy.

    python bench.py --quick --json /tmp/bq.json      # N = 100, 3 rounds: a check in under 2 minutes on 2 cores
    python bench.py --json /tmp/b.json               # N = 576, 5 rounds: under 10 minutes on 2 cores
    python bench.py --device cuda --size 7b --grad-checkpointing --json b7.json
    python bench.py --device cuda --model deepseek-community/Janus-Pro-7B --grad-checkpointing --json real7.json

Timing: a warm-up run of each side, then --pairs rounds; a round runs each compared side once (the order rotates from
round to round), each followed by a run of the base, and compares it with the mean of the base runs just before and
after it. A figure is the median over the rounds, [min, max] its spread; wall clock, and on CPU the process' CPU
time too, which leaves out waiting for a core on a shared machine.
"""
import argparse
import contextlib
import copy
import gc
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch
import transformers
from tqdm import tqdm

import spm_janus as spm

# Real Janus-Pro dims (deepseek-community/Janus-Pro-1B, -7B config.json): a DeepSeek-LLM Llama, SigLIP-L 384/16 for
# understanding, VQ-16 with a 16384 x 8 codebook for generation, 576 image tokens (24 x 24).
JANUS_PRO = {"1b": dict(hidden=2048, intermediate=5632, layers=24, heads=16),
             "7b": dict(hidden=4096, intermediate=11008, layers=30, heads=32)}
TINY_WIDE = dict(hidden=256, intermediate=512, layers=4, heads=4, codebook=1024)
PROMPT, CFG, TEMPERATURE, ETA = "a photo of a mouse", 5.0, 1.0, 1.0
MERGED_LAYERS = "attn+mlp"  # the worst case for merged sampling: every wrapped Linear is one more module call
SECTIONS = ("train", "sample", "teacher", "memory")


class BenchError(Exception):
    """Bad input, printed as one line."""


# -----------------------------------------------------------------------------
# Models


def janus_pro_config(size, image_token_id=5, num_layers=None, num_tokens=576):
    """JanusConfig with the real Janus-Pro-1B / -7B dims, for random-init speed and memory runs (no download).

    spm_janus.janus_config sets the Llama, the codebook and the VQ channels; the SigLIP-L tower and the VQ decoder's
    depth it keeps tiny are set here. Token ids follow spm_janus.word_tokenizer (pad 0, bos 1, eos 2)."""
    dims = dict(JANUS_PRO[size], **({"layers": num_layers} if num_layers else {}))
    config = spm.janus_config(102400, **dims, grid=math.isqrt(num_tokens), patch=16, codebook=16384, vq_embed_dim=8,
                              vq_channels=128, vq_multiplier=(1, 1, 2, 2, 4), image_token_id=image_token_id,
                              context=16384)
    vision = config.vision_config
    vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads = 1024, 24, 16
    vision.projection_dim = dims["hidden"]  # the understanding aligner maps SigLIP to the LLM width
    config.vq_config.latent_channels, config.vq_config.num_res_blocks = 256, 2
    return config


def build_model(args, device, dtype):
    """(model, tokenizer): random weights, created in their dtype on their device (no fp32 host copy of a 7B); or,
    with --model, a real checkpoint, whose image tokens set N."""
    from transformers import JanusForConditionalGeneration

    if args.model:
        model, tokenizer = spm.load_model(args.model, args.dtype, device)
        args.image_tokens = model.config.vision_config.num_image_tokens
        if args.grad_checkpointing:
            model.model.language_model.activation_checkpointing_enable()
        return model, tokenizer
    words = set(" ".join(spm.DEFAULT_TEMPLATES).replace("{}", " ").split()) | set(spm.COMMON_CONCEPTS) | {"real"}
    tokenizer = spm.word_tokenizer(sorted(words))
    image_token_id = tokenizer.convert_tokens_to_ids("<image_placeholder>")
    if args.size == "tiny":
        config = spm.janus_config(len(tokenizer), grid=math.isqrt(args.image_tokens), image_token_id=image_token_id,
                                  **TINY_WIDE)
    else:
        config = janus_pro_config(args.size, image_token_id, args.num_layers, args.image_tokens)
    torch.manual_seed(args.seed)
    with torch.device(device):
        model = JanusForConditionalGeneration._from_config(config, dtype=dtype)
    model.requires_grad_(False).eval()
    spm.set_generation_defaults(model, tokenizer, CFG, TEMPERATURE)
    if args.grad_checkpointing:  # acts in train mode only; see training_mode()
        model.model.language_model.activation_checkpointing_enable()
    return model, tokenizer


@contextlib.contextmanager
def training_mode(model, on):
    """transformers checkpoints layers only in train mode, and there it drops the KV cache: train mode for the
    one-pass step, eval mode (the default) for everything that needs the cache."""
    model.model.language_model.train(on)
    try:
        yield
    finally:
        model.model.language_model.eval()


def attach(model, tokenizer, layers, scope, rank, seed=0):
    """Membranes with non-zero factors (a fresh one has up = 0): the same seeded factors on every call."""
    membranes = spm.attach_membranes(model, tokenizer, layers=layers, rank=rank, scope=scope)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, t in membranes.state_dict().items():  # down ~ 1/sqrt(in) like nn.Linear, up small: a modest change
        std = 0.02 if name.endswith(".up") else t.shape[1] ** -0.5
        tensors[name] = torch.randn(t.shape, generator=generator) * std
    membranes.load_state_dict(tensors)
    return membranes


def prompt_embeds(model, tokenizer, batch, device):
    input_ids, mask = spm.encode_prompts(tokenizer, [PROMPT] * batch, device)
    embed = model.get_input_embeddings()
    with torch.no_grad():
        return embed(input_ids), embed(spm.unconditional_ids(input_ids, tokenizer)), mask


# -----------------------------------------------------------------------------
# Timing and memory


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def seconds(fn, device):
    """(wall, CPU) seconds of fn(). On a shared CPU the process' CPU time leaves out the time spent waiting for a
    core, so its ratios are steadier; on CUDA it means nothing and is dropped."""
    sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    sync(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def rounds(sides, args, device):
    """Time the callables of `sides` (name -> fn; the first is the base) in --pairs rounds, after a warm-up run of
    each. A round runs every other side once, in an order that rotates from round to round, each followed by a run
    of the base: a side's time is compared with the mean of the two base runs around it, so that a slow phase of a
    shared machine hits both alike. Returns name -> {ratio, spread: [min, max], ratio_cpu, spread_cpu, base_s, s}
    for every side but the base."""
    names = list(sides)
    base, others = names[0], names[1:]
    for _ in range(args.warmup_runs):
        for name in names:
            sides[name]()
    times = {name: [] for name in names}
    ratios = {name: ([], []) for name in others}  # wall, CPU
    before = seconds(sides[base], device)
    times[base].append(before)
    for i in tqdm(range(args.pairs), desc=f"timing {' / '.join(names)}", unit="round", leave=False, file=sys.stderr,
                  dynamic_ncols=True):
        shift = i % len(others)
        for name in others[shift:] + others[:shift]:
            t = seconds(sides[name], device)
            after = seconds(sides[base], device)
            times[name].append(t), times[base].append(after)
            for clock in (0, 1):
                ratios[name][clock].append(t[clock] / max((before[clock] + after[clock]) / 2, 1e-9))
            before = after
    result = {}
    for name in others:
        summary = {"base_s": statistics.median(t[0] for t in times[base]),
                   "s": statistics.median(t[0] for t in times[name])}
        for clock, suffix in ((0, ""), (1, "_cpu")):
            if clock and device.type == "cuda":  # the host's CPU time says nothing about the GPU
                continue
            summary["ratio" + suffix] = statistics.median(ratios[name][clock])
            summary["spread" + suffix] = [min(ratios[name][clock]), max(ratios[name][clock])]
        result[name] = summary
    return result


def put(result, key, timing, offset=0.0):
    """Store a timing's median and spread (wall, and CPU time where measured) under key; offset -1 = overhead."""
    for suffix in ("", "_cpu"):
        if "ratio" + suffix in timing:
            result[key + suffix] = timing["ratio" + suffix] + offset
            result[key + suffix + "_spread"] = [r + offset for r in timing["spread" + suffix]]


@contextlib.contextmanager
def quiet_stderr():
    """The CPU profiler's kineto backend prints a start/stop line on fd 2 every time."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_bytes(fn, device):
    """Peak bytes allocated while fn runs, above what was allocated when it started (allocator level).

    CUDA: the caching allocator's own peak. CPU: torch's CPU allocations are invisible to tracemalloc and RSS keeps
    freed pages, so the profiler records every allocation and free (profile_memory=True) and we take the running
    sum's maximum."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start
    from torch.profiler import ProfilerActivity, profile

    with quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    total = peak = 0
    for _, nbytes in events:
        total += nbytes
        peak = max(peak, total)
    return peak


def rss_bytes():
    """(current RSS, peak RSS) of this process. Linux: VmRSS and VmHWM of /proc/self/status, whose peak
    reset_peak_rss() can reset; elsewhere the peak is ru_maxrss (which a forked child inherits from its parent)."""
    try:
        with open("/proc/self/status") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024
    except (OSError, KeyError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
        return peak, peak


def reset_peak_rss():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux >= 4.0: VmHWM := VmRSS
    except OSError:
        pass


MB = 2 ** 20


# -----------------------------------------------------------------------------
# The two ways to train, the two ways to do CFG


def stepwise_logits(model, embeds, mask, codes):
    """Logits [B, N, V] as peers train: N forward passes of one token each, with a KV cache, graph kept."""
    from transformers import DynamicCache

    language_model, head = model.model.language_model, model.model.generation_head
    cache = DynamicCache(config=language_model.config)
    position_ids, logits = spm.positions(mask), []
    for i in range(codes.shape[1]):
        if i:  # the image token sampled at step i-1 is the input of step i
            embeds = model.prepare_embeddings_for_image_generation(codes[:, i - 1:i]).to(embeds.dtype)
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
            position_ids = position_ids[:, -1:] + 1
        hidden = language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids, cache=cache,
                                use_cache=True).last_hidden_state
        logits.append(head(hidden[:, -1]))
    return torch.stack(logits, 1).float()


@torch.no_grad()
def sample_codes_two_passes(model, cond_embeds, uncond_embeds, mask, cfg, temperature, uniforms):
    """The 'before' of the doubled CFG batch: a conditional and an unconditional pass per step, two KV caches.
    Same inverse-CDF draw as spm_janus.sample_codes, so the tokens can be compared."""
    from transformers import DynamicCache

    language_model, head = model.model.language_model, model.model.generation_head
    inputs = [cond_embeds, uncond_embeds]
    caches = [DynamicCache(config=language_model.config) for _ in inputs]
    position_ids = spm.positions(mask)
    codes = torch.zeros(cond_embeds.shape[0], model.config.vision_config.num_image_tokens, dtype=torch.long,
                        device=cond_embeds.device)
    for i in range(codes.shape[1]):
        cond, uncond = (head(language_model(inputs_embeds=x, attention_mask=mask, position_ids=position_ids, cache=c,
                                            use_cache=True).last_hidden_state[:, -1]).float()
                        for x, c in zip(inputs, caches))
        cdf = torch.softmax(spm.cfg_combine(cond, uncond, cfg).double() / temperature, -1).cumsum(-1)
        drawn = torch.searchsorted(cdf, uniforms[:, i:i + 1].to(cdf) * cdf[:, -1:]).squeeze(1)
        codes[:, i] = drawn.clamp(max=cdf.shape[-1] - 1)
        step = model.prepare_embeddings_for_image_generation(codes[:, i])[:, None]
        inputs = [step, step]
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
        position_ids = position_ids[:, -1:] + 1
    return codes


# -----------------------------------------------------------------------------
# Sections: each returns a dict of results


def bench_train(model, tokenizer, args, device):
    """One teacher-forced pass vs stepping through the image: same loss, wall time, peak memory."""
    B, N = args.batch_size, args.image_tokens
    membranes = attach(model, tokenizer, "attn", "image", args.rank)
    try:
        cond, uncond, mask = prompt_embeds(model, tokenizer, B, device)
        uniforms = spm.rollout_uniforms(args.seed, 0, 0, B, N, device)
        codes = spm.sample_codes(model, cond, uncond, mask, CFG, TEMPERATURE, uniforms)
        with torch.no_grad(), membranes.disabled():  # the teacher is the same model, membranes off
            concept, surrogate = spm.batched_image_logits(model, [(cond, mask, codes), (uncond, mask, codes)])
        target = surrogate - ETA * (concept - surrogate)  # the erasure target, fixed
        del concept, surrogate
        last = {}  # each side's latest (loss, logits, grads): the agreement check needs no extra run

        def step(name, logits_fn):
            for p in membranes.parameters():
                p.grad = None
            logits = logits_fn()
            loss = spm.divergence(logits, target)
            loss.backward()
            last[name] = (loss.item(), logits.detach(), [p.grad.clone() for p in membranes.parameters()])

        def one_pass():
            with training_mode(model, args.grad_checkpointing):
                step("one_pass", lambda: spm.image_logits(model, cond, mask, codes))

        def stepwise():
            step("stepwise", lambda: stepwise_logits(model, cond, mask, codes))

        try:
            timing = rounds({"one_pass": one_pass, "stepwise": stepwise}, args, device)["stepwise"]
        except torch.OutOfMemoryError:  # stepwise keeps every step's KV cache in the graph: O(N^2) memory
            last.clear()
            gc.collect()
            torch.cuda.empty_cache()
            times = [seconds(one_pass, device)[0] for _ in range(args.warmup_runs + args.pairs)][args.warmup_runs:]
            one_s = statistics.median(times)
            return {"stepwise_error": "out of memory", "one_pass_s": one_s, "one_pass_tokens_per_s": B * N / one_s,
                    "one_pass_peak_mb": peak_bytes(one_pass, device) / MB}
        (loss_a, logits_a, grads_a), (loss_b, logits_b, grads_b) = last["one_pass"], last["stepwise"]
        grad_scale = max(g.abs().max().item() for g in grads_a)
        result = {"loss": loss_a, "loss_max_abs_diff": abs(loss_a - loss_b),
                  "logits_max_abs_diff": (logits_a - logits_b).abs().max().item(),
                  "grad_max_abs_diff_over_max_grad":
                      max((a - b).abs().max().item() for a, b in zip(grads_a, grads_b)) / grad_scale}
        del logits_a, logits_b, grads_a, grads_b
        last.clear()
        one_peak, step_peak = peak_bytes(one_pass, device), peak_bytes(stepwise, device)
        last.clear()
        put(result, "stepwise_over_one_pass", timing)
        result.update({"one_pass_s": timing["base_s"], "stepwise_s": timing["s"],
                       "one_pass_tokens_per_s": B * N / timing["base_s"], "stepwise_tokens_per_s": B * N / timing["s"],
                       "one_pass_peak_mb": one_peak / MB, "stepwise_peak_mb": step_peak / MB,
                       "one_pass_peak_mem_over_stepwise": one_peak / step_peak})
        return result
    finally:
        membranes.detach()


def bench_sample(model, tokenizer, args, device):
    """Sampling the same seeds, timed in shared rounds against the base model with no membranes attached:
    unmerged membranes (attn; attn+mlp), merged ones (scope all), and CFG as two passes per step instead of one
    doubled batch. Membranes go on copies of the model, so the base keeps none."""
    cond, uncond, mask = prompt_embeds(model, tokenizer, args.sample_batch, device)
    uniforms = spm.rollout_uniforms(args.seed, 0, 0, args.sample_batch, args.image_tokens, device)
    last = {}

    def sampler(name, m, fn=spm.sample_codes):
        def run():
            last[name] = fn(m, cond, uncond, mask, CFG, TEMPERATURE, uniforms)
        return run

    twins = {"attn": copy.deepcopy(model), "attn_mlp": copy.deepcopy(model), "merged": copy.deepcopy(model)}
    handles = [attach(twins["attn"], tokenizer, "attn", "image", args.rank),
               attach(twins["attn_mlp"], tokenizer, "attn+mlp", "image", args.rank),
               attach(twins["merged"], tokenizer, MERGED_LAYERS, "all", args.rank)]
    try:
        sampler("unmerged", twins["merged"])()  # the same membranes before merging, same seeds
        handles[-1].merge()
        sides = {"plain": sampler("plain", model)}
        sides.update({name: sampler(name, twin) for name, twin in twins.items()})
        sides["cfg_two_passes"] = sampler("cfg_two_passes", model, sample_codes_two_passes)
        if args.aa:  # a plain copy of the model: how far apart two identical sides time on this machine
            twins["aa"] = copy.deepcopy(model)
            sides["aa"] = sampler("aa", twins["aa"])
        timing = rounds(sides, args, device)
    finally:
        for handle in handles:
            handle.detach()
        twins.clear()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    result = {"plain_sample_s": timing["attn"]["base_s"],
              "plain_sample_tokens_per_s": args.sample_batch * args.image_tokens / timing["attn"]["base_s"],
              "merged_layers": MERGED_LAYERS,
              "merged_tokens_identical": bool(torch.equal(last["unmerged"], last["merged"])),
              "merged_tokens_differing": int((last["unmerged"] != last["merged"]).sum()),
              "cfg_two_passes_tokens_identical": bool(torch.equal(last["plain"], last["cfg_two_passes"]))}
    put(result, "cfg_two_passes_over_doubled", timing["cfg_two_passes"])
    for name, key in (("attn", "membrane_sampling_overhead_attn"), ("attn_mlp", "membrane_sampling_overhead_attn_mlp"),
                      ("merged", "merged_sampling_overhead"), ("aa", "aa_sampling_overhead")):
        if name in timing:
            put(result, key, timing[name], -1.0)
    return result


def bench_teacher(model, tokenizer, args, device):
    """The teacher's concept and surrogate (empty-prompt) logits: one batched no-grad pass vs two passes."""
    B = args.batch_size
    cond, uncond, mask = prompt_embeds(model, tokenizer, B, device)
    codes = spm.sample_codes(model, cond, uncond, mask, CFG, TEMPERATURE,
                             spm.rollout_uniforms(args.seed, 0, 0, B, args.image_tokens, device))
    parts = [(cond, mask, codes), (uncond, mask, codes)]

    @torch.no_grad()
    def batched():
        spm.batched_image_logits(model, parts)

    @torch.no_grad()
    def separate():
        for part in parts:
            spm.image_logits(model, *part)

    teacher = rounds({"batched": batched, "separate": separate}, args, device)["separate"]
    result = {"teacher_batched_s": teacher["base_s"], "teacher_separate_s": teacher["s"]}
    put(result, "teacher_two_passes_over_batched", teacher)
    return result


def trainer_for(model, tokenizer, args):
    """spm_janus.Trainer with the training defaults (KL, attn, prompt anchoring, augment, adversarial soft) and
    --batch-size."""
    config = spm.Config(model="tiny", concept="mouse", steps=1, batch_size=args.batch_size, rank=args.rank)
    config = config.resolved(model, tokenizer)
    membranes = spm.attach_for(model, tokenizer, config)
    return spm.Trainer(model, tokenizer, membranes, config), membranes


def memory_workload(model, tokenizer, args, kind):
    """(fn, membranes or None): one real training step (rollout, teacher, student, backward, AdamW), or a plain
    sampling pass over as many rows as that step's rollout (concept + anchor prompts)."""
    if kind == "train":
        trainer, membranes = trainer_for(model, tokenizer, args)

        def train_step():
            with training_mode(model, args.grad_checkpointing):
                trainer.step()
        return train_step, membranes
    seeds = list(range(2 * args.batch_size))
    return (lambda: spm.sample_prompts(model, tokenizer, [PROMPT], seeds, CFG, TEMPERATURE)), None


def child(args):
    """Hidden --_child train|sample: a fresh process, whose peak RSS is the workload's whole-process peak."""
    model, tokenizer = build_model(args, torch.device("cpu"), DTYPES[args.dtype])
    workload = memory_workload(model, tokenizer, args, args._child)[0]
    gc.collect()
    reset_peak_rss()  # the peak of the workload, not of building the model
    baseline = rss_bytes()[0]
    workload()
    print(json.dumps({"baseline_mb": baseline / MB, "peak_mb": rss_bytes()[1] / MB}))


def bench_memory(model, tokenizer, args, device):
    """Peak memory of a training step vs a plain sampling pass on the same model, whole process."""
    if device.type == "cuda":  # everything allocated on the GPU, weights included: the whole-process analogue
        peaks = {}
        for kind in ("sample", "train"):
            workload, membranes = memory_workload(model, tokenizer, args, kind)
            workload()  # warm-up: the optimizer state and caches exist in a long run too
            gc.collect()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            workload()
            torch.cuda.synchronize()
            peaks[kind] = torch.cuda.max_memory_allocated() / MB
            if membranes is not None:
                membranes.detach()
        baseline = sum(p.numel() * p.element_size() for p in model.parameters()) / MB
        method = "torch.cuda.max_memory_allocated (weights included), in this process"
    else:
        model_flags = ["--model", args.model] if args.model else \
            ["--size", args.size, "--image-tokens", str(args.image_tokens)]
        command = [sys.executable, os.path.abspath(__file__), *model_flags,
                   "--batch-size", str(args.batch_size), "--rank", str(args.rank), "--threads", str(args.threads),
                   "--dtype", args.dtype, "--seed", str(args.seed)] + \
                  (["--num-layers", str(args.num_layers)] if args.num_layers else []) + \
                  (["--grad-checkpointing"] if args.grad_checkpointing else [])
        # Both at once: a process' RSS does not depend on who else runs, and each child spends most of its time
        # importing torch and transformers.
        children = {kind: subprocess.Popen(command + ["--_child", kind], stdout=subprocess.PIPE,
                                           stderr=subprocess.PIPE, text=True) for kind in ("train", "sample")}
        peaks, baselines = {}, []
        for kind, process in children.items():
            out, err = process.communicate()
            if process.returncode:
                return {"memory_error": f"the {kind} child failed: {(err.strip().splitlines() or ['?'])[-1]}"}
            child_result = json.loads(out.strip().splitlines()[-1])
            peaks[kind] = child_result["peak_mb"]
            baselines.append(child_result["baseline_mb"])
        baseline = statistics.mean(baselines)
        method = "peak RSS (VmHWM, reset after the model is built) of a fresh subprocess each: " \
                 "python bench.py --_child train|sample"
    return {"train_peak_mb": peaks["train"], "sample_peak_mb": peaks["sample"], "baseline_mb": baseline,
            "train_peak_over_sample_peak": peaks["train"] / peaks["sample"], "memory_method_process": method}


# -----------------------------------------------------------------------------
# Command line


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_parser():
    parser = spm.OneLineParser(prog="bench.py", description="Benchmark spm-janus: one-pass training vs stepping through the "
                                                 "image, the cost of membranes when sampling, memory.")
    g = parser.add_argument_group("model")
    g.add_argument("--size", default="tiny", choices=["tiny", "1b", "7b"],
                   help="tiny = random tiny-but-wide model (hidden 256, 4 layers, codebook 1024); 1b, 7b = random "
                        "weights with the real Janus-Pro dims (default: tiny)")
    g.add_argument("--model", default=None,
                   help="instead of --size: a Janus checkpoint in transformers' format, hub id or directory (e.g. "
                        "deepseek-community/Janus-Pro-7B), with its own weights, tokenizer and image tokens")
    g.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to run (default: cpu)")
    g.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                   help="weight dtype (default: float32 for tiny, bfloat16 for 1b/7b; with --model, bfloat16 on "
                        "cuda, float32 on cpu)")
    g.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads, 0 = torch's default (default: 1: as fast for small models, and steady "
                        "when other processes load the CPU)")
    g.add_argument("--num-layers", type=int, default=None,
                   help="decoder layers of 1b/7b (default: the real count); 1 = a smoke run of the real widths on CPU")
    g.add_argument("--grad-checkpointing", action="store_true",
                   help="activation checkpointing in the training steps (for 7B on one GPU)")
    g.add_argument("--seed", type=int, default=0, help="seed of weights, rollouts and membrane factors (default: 0)")

    g = parser.add_argument_group("workload")
    g.add_argument("--image-tokens", type=int, default=None,
                   help="image tokens N, a square (default: 576, Janus-Pro's; 100 with --quick; was --tokens)")
    g.add_argument("--batch-size", type=int, default=1,
                   help="concept rows of a training step, as spm_janus.py's --batch-size (was --train-batch); the "
                        "memory section's Trainer adds as many anchor rows (default: 1)")
    g.add_argument("--sample-batch", type=int, default=1,
                   help="images per sampling pass, CFG doubles the rows (default: 1, the worst case for per-op "
                        "overhead)")
    g.add_argument("--rank", type=int, default=1, help="membrane rank (default: 1)")

    g = parser.add_argument_group("timing")
    g.add_argument("--quick", action="store_true", help="N = 100 and 3 rounds: a check in under 2 minutes on 2 cores")
    g.add_argument("--pairs", type=int, default=None,
                   help="timed rounds: each compared side once a round, between two runs of its base "
                        "(default: 5; 3 with --quick)")
    g.add_argument("--warmup-runs", type=int, default=1, help="untimed runs of each side first (default: 1; was --warmup, "
                                                                         "which is spm_janus.py's learning-rate warm-up)")
    g.add_argument("--sections", default=",".join(SECTIONS),
                   help=f"comma-separated subset of {','.join(SECTIONS)} (default: all)")
    g.add_argument("--aa", action="store_true",
                   help="add an A/A side to the sampling rounds, a plain copy of the model: the noise floor")

    g = parser.add_argument_group("output")
    g.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--_child", choices=["train", "sample"], default=None, help=argparse.SUPPRESS)
    return parser


def check_args(args):
    """Everything that can fail before a model is built, as one-line errors."""
    if args.model and (args.size != "tiny" or args.image_tokens or args.num_layers):
        raise BenchError("--model brings its own size, image tokens and layers: drop --size, --image-tokens and --num-layers")
    for flag in ("image_tokens", "pairs"):  # 0 is no request for the default
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise BenchError(f"--{flag.replace('_', '-')} {getattr(args, flag)} must be at least 1")
    args.image_tokens = args.image_tokens or (100 if args.quick else 576)  # with --model, the model's (set when it loads)
    args.pairs = args.pairs or (3 if args.quick else 5)
    if args.model:  # a real checkpoint is stored in bfloat16: keep it on a GPU, float32 on a CPU
        args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    args.dtype = args.dtype or ("float32" if args.size == "tiny" else "bfloat16")
    if args.image_tokens < 4 or math.isqrt(args.image_tokens) ** 2 != args.image_tokens:
        raise BenchError(f"--image-tokens {args.image_tokens} must be a square of at least 4 (the image is a grid), "
                         f"e.g. 144 or 576")
    for flag in ("pairs", "batch_size", "sample_batch", "rank"):
        if getattr(args, flag) < 1:
            raise BenchError(f"--{flag.replace('_', '-')} {getattr(args, flag)} must be at least 1")
    if args.warmup_runs < 0 or args.threads < 0:
        raise BenchError("--warmup-runs and --threads cannot be negative")
    if args.num_layers is not None and (args.size == "tiny" or args.num_layers < 1):
        raise BenchError("--num-layers takes a positive count and applies to --size 1b/7b only")
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown or not sections:
        raise BenchError(f"--sections {args.sections!r}: choose from {','.join(SECTIONS)}")
    args.sections = sections
    if args.device == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda, but this machine has no CUDA device (torch "
                         f"{torch.__version__}): run with --device cpu, or on a GPU machine")
    if args.device == "cpu" and args.size != "tiny" and not args.num_layers and not args.model:
        raise BenchError(f"--size {args.size} on CPU takes hours: use --device cuda, or add --num-layers 1 for a "
                         f"smoke run of the real-width code path")
    if args.device == "cpu" and args.dtype != "float32" and "train" in args.sections:
        print("note: losses agree to ~1e-6 in float32 only; bf16/fp16 rounding differs between the two ways")
    if args.json:  # its directory is made here (runs/ before a first run), so a long run cannot fail at the end
        parent = os.path.dirname(os.path.abspath(args.json))
        try:
            os.makedirs(parent, exist_ok=True)
        except OSError:
            pass
        if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
            raise BenchError(f"--json {args.json}: directory {parent} cannot be made or written")


def targets(r, args):
    """The issue's targets, for the tiny-wide model on CPU: key -> (target text, met)."""
    if args.size != "tiny" or args.device != "cpu" or args.model:
        return {}
    checks = {"loss_max_abs_diff": ("<= 1e-5 (about 1e-6)", lambda v: v <= 1e-5),
              "membrane_sampling_overhead_attn": ("<= 15%", lambda v: v <= 0.15),
              "membrane_sampling_overhead_attn_mlp": ("<= 30%", lambda v: v <= 0.30),
              "merged_sampling_overhead": ("|x| <= 5%", lambda v: abs(v) <= 0.05),
              "merged_tokens_identical": ("True", lambda v: v is True),
              "train_peak_over_sample_peak": ("<= 2x", lambda v: v <= 2)}
    if args.quick:
        checks["stepwise_over_one_pass"] = (">= 10x", lambda v: v >= 10)
    if args.image_tokens >= 576:  # at small N the one pass' fixed costs weigh more; these are for Janus-Pro's N
        checks["stepwise_over_one_pass"] = (">= 20x", lambda v: v >= 20)
        checks["one_pass_peak_mem_over_stepwise"] = ("<= 0.1x", lambda v: v <= 0.1)
    return {key: {"target": text, "met": bool(check(r[key]))} for key, (text, check) in checks.items() if key in r}


def fmt(x, kind):
    return {"x": f"{x:.1f}x", "x2": f"{x:.3f}x", "%": f"{100 * x:+.1f}%", "e": f"{x:.1e}"}[kind]


def table(r, goals):
    """The readable table: median and [min, max] over the rounds, wall clock, then CPU time, then the target."""
    rows = []

    def row(label, key, kind, target=""):
        if key not in r:
            return
        goal = goals.get(key)
        target = f"{goal['target']}: {'met' if goal['met'] else 'MISSED'}" if goal else target
        cells = [label, fmt(r[key], kind)]
        for k in (key + "_spread", key + "_cpu", key + "_cpu_spread"):
            v = r.get(k)
            cells.append("" if v is None else f"[{fmt(v[0], kind)}, {fmt(v[1], kind)}]" if isinstance(v, list)
                         else fmt(v, kind))
        rows.append(cells + [target])

    def note(label, text):
        rows.append([label, text])

    row("train step: stepwise / one pass", "stepwise_over_one_pass", "x")
    if "one_pass_s" in r:
        note("  one pass / stepwise, s", f"{r['one_pass_s']:.3f} / {r['stepwise_s']:.2f}")
        note("  one pass / stepwise, image tokens/s",
             f"{r['one_pass_tokens_per_s']:.0f} / {r['stepwise_tokens_per_s']:.0f}")
    row("  loss |one pass - stepwise|", "loss_max_abs_diff", "e")
    row("  logits max |one pass - stepwise|", "logits_max_abs_diff", "e")
    row("  grads max |diff| / max |grad|", "grad_max_abs_diff_over_max_grad", "e")
    row("peak memory: one pass / stepwise", "one_pass_peak_mem_over_stepwise", "x2")
    if "one_pass_peak_mb" in r:
        note("  one pass / stepwise, MB", f"{r['one_pass_peak_mb']:.1f} / {r['stepwise_peak_mb']:.1f}")
    row("sampling overhead: membranes attn", "membrane_sampling_overhead_attn", "%")
    row("sampling overhead: membranes attn+mlp", "membrane_sampling_overhead_attn_mlp", "%")
    row(f"sampling overhead: merged {r.get('merged_layers', '')}", "merged_sampling_overhead", "%")
    row("sampling A/A: plain copy vs plain", "aa_sampling_overhead", "%", "noise floor")
    if "merged_tokens_identical" in r:
        goal = goals.get("merged_tokens_identical")
        note("  merged tokens == unmerged tokens", str(r["merged_tokens_identical"]) +
             (f"   (target {goal['target']}: {'met' if goal['met'] else 'MISSED'})" if goal else ""))
    if "plain_sample_s" in r:
        note("  plain sampling, s / image tokens/s",
             f"{r['plain_sample_s']:.2f} / {r['plain_sample_tokens_per_s']:.0f}")
    row("speed-up: CFG two passes / doubled batch", "cfg_two_passes_over_doubled", "x2", "> 1: doubling pays")
    if "cfg_two_passes_tokens_identical" in r:
        note("  two-pass tokens == doubled-batch tokens", str(r["cfg_two_passes_tokens_identical"]))
    row("speed-up: teacher two passes / batched", "teacher_two_passes_over_batched", "x2", "> 1: batching pays")
    row("peak memory: train step / sampling pass", "train_peak_over_sample_peak", "x2")
    if "train_peak_mb" in r:
        note("  train / sample / model built, MB",
             f"{r['train_peak_mb']:.0f} / {r['sample_peak_mb']:.0f} / {r['baseline_mb']:.0f}")
    for key in [k for k in r if k.endswith("_error")]:
        note(f"  {key}", r[key])
    header = ["", "median", "[min, max]", "CPU time", "[min, max]", "target"]
    widths = [max(len(x[i]) for x in rows + [header] if len(x) == 6) for i in range(6)]  # header: never empty
    lines = []
    for cells in [header] + rows:
        if len(cells) == 2:  # a note: its text may run on
            lines.append(f"{cells[0]:{widths[0]}}  {cells[1]}")
        else:
            lines.append(f"{cells[0]:{widths[0]}}  " + "  ".join(f"{c:>{w}}" for c, w in zip(cells[1:5], widths[1:5]))
                         + f"  {cells[5]}")
    return "\n".join(lines)


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        check_args(args)
        if args.threads:
            torch.set_num_threads(args.threads)
        if args._child:
            return child(args)
        device, dtype = torch.device(args.device), DTYPES[args.dtype]
        started = time.time()
        model, tokenizer = build_model(args, device, dtype)
        text = model.config.text_config
        name = (args.model if args.model else "tiny-wide" if args.size == "tiny" else
                f"Janus-Pro-{args.size.upper()} dims, random weights") + \
            f" (hidden {text.hidden_size}, {text.num_hidden_layers} layers, " \
            f"codebook {model.config.vq_config.num_embeddings})"
        where = torch.cuda.get_device_name() if device.type == "cuda" else \
            f"{os.cpu_count()} CPU cores ({platform.machine()}), {torch.get_num_threads()} torch thread(s)"
        print(f"{name}; N = {args.image_tokens}; {args.device} {args.dtype}; {where}; torch {torch.__version__}; "
              f"{args.pairs} rounds")
        results = {"n_image_tokens": args.image_tokens, "device": args.device, "device_name": where, "model": name,
                   "dtype": args.dtype, "threads": torch.get_num_threads(), "pairs": args.pairs,
                   "train_batch": args.batch_size, "sample_batch": args.sample_batch, "rank": args.rank,
                   "grad_checkpointing": args.grad_checkpointing, "quick": args.quick, "torch": torch.__version__,
                   "transformers": transformers.__version__, "python": platform.python_version(),
                   "memory_method_train": "torch.cuda.max_memory_allocated, above the start" if device.type == "cuda"
                   else "torch.profiler(profile_memory=True): running sum of the CPU allocator's allocations and "
                        "frees, peak above the start"}
        sections = {"train": bench_train, "sample": bench_sample, "teacher": bench_teacher, "memory": bench_memory}
        for section in args.sections:
            section_started = time.time()
            try:
                results.update(sections[section](model, tokenizer, args, device))
            except torch.OutOfMemoryError as e:
                results[f"{section}_error"] = f"out of memory: {str(e).splitlines()[0]}"
                gc.collect()
                torch.cuda.empty_cache()
            print(f"  {section}: {time.time() - section_started:.1f} s", flush=True)
        results["wall_s"] = round(time.time() - started, 1)
        results["targets"] = targets(results, args)
        print(table(results, results["targets"]))
        if results["targets"]:
            missed = [k for k, v in results["targets"].items() if not v["met"]]
            print(f"targets met: {len(results['targets']) - len(missed)}/{len(results['targets'])}"
                  + (f" (missed: {', '.join(missed)})" if missed else ""))
        print(f"peak memory, one pass vs stepwise: {results['memory_method_train']}")
        if "memory_method_process" in results:
            print(f"peak memory, train step vs sampling pass: {results['memory_method_process']}")
        print(f"total {results['wall_s']} s")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)
    except (BenchError, spm.SPMError) as e:
        print(f"bench.py: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
