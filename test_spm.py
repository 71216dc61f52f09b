"""Tests on tiny random Janus models built in-process: exact equalities, no downloads."""
import contextlib
import dataclasses
import json
import math
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import LogitsProcessor, LogitsProcessorList

import attack
import evaluation
import inference
import spm_janus as spm

torch.set_num_threads(1)  # tiny matmuls: more threads only add contention

HERE = Path(__file__).resolve().parent
PROMPTS = ["a photo of a mouse", "a picture of a cat"]  # same token length: native generate does not handle padding


def tiny():
    model, tokenizer = spm.build_tiny_janus(seed=0)
    return model.eval().requires_grad_(False), tokenizer


def train_config(model, tokenizer, **settings):
    """A resolved Config on the tiny model. Cheap unless a test asks otherwise: no adversarial soft prompt and no
    augmentation (the defaults, which every test would otherwise pay for), anchors cat and car."""
    cheap = dict(model="tiny", concept="mouse", adversarial="none", augment=0.0, anchor_prompts=["cat", "car"])
    return spm.Config(**{**cheap, **settings}).resolved(model, tokenizer)


RUN = spm.Config(model="tiny", concept="mouse")  # the settings saved with membranes made by hand


def randomise(membranes, seed=0, scale=0.5):
    """Stand-in for trained membranes: non-zero up factors."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in membranes.modules.values():
            m.up.weight.copy_(torch.randn(m.up.weight.shape, generator=generator) * scale)
            m.down.weight.copy_(torch.randn(m.down.weight.shape, generator=generator) * scale)


def prompt_batch(model, tokenizer, prompts=PROMPTS):
    input_ids, mask = spm.encode_prompts(tokenizer, prompts)
    embed = model.get_input_embeddings()
    return input_ids, embed(input_ids), embed(spm.unconditional_ids(input_ids, tokenizer)), mask


def codes_for(model, tokenizer, seed=0):
    _, cond, uncond, mask = prompt_batch(model, tokenizer)
    uniforms = spm.rollout_uniforms(seed, 0, 0, len(PROMPTS), model.config.vision_config.num_image_tokens)
    return spm.sample_codes(model, cond, uncond, mask, 5.0, 1.0, uniforms)


def all_logits(model, tokenizer, codes):
    _, cond, uncond, mask = prompt_batch(model, tokenizer)
    with torch.no_grad():
        return spm.image_logits(model, torch.cat([cond, uncond]), mask.repeat(2, 1), codes.repeat(2, 1))


# -----------------------------------------------------------------------------
# The membrane


@pytest.mark.parametrize("layers", ["attn", "mlp", "attn+mlp"])
def test_fresh_membranes_change_nothing_and_detach_restores(layers):
    model, tokenizer = tiny()
    codes = codes_for(model, tokenizer)
    before = all_logits(model, tokenizer, codes)
    modules_before = {n: m for n, m in model.named_modules()}
    membranes = spm.attach_membranes(model, tokenizer, layers=layers, scope="all")
    assert torch.equal(all_logits(model, tokenizer, codes), before)
    randomise(membranes)
    assert not torch.allclose(all_logits(model, tokenizer, codes), before)
    membranes.detach()
    assert {n: m for n, m in model.named_modules()} == modules_before  # the very same module objects
    assert torch.equal(all_logits(model, tokenizer, codes), before)


def test_disabled_is_exact_base_and_state_restored_after_exception():
    model, tokenizer = tiny()
    codes = codes_for(model, tokenizer)
    base = all_logits(model, tokenizer, codes)
    membranes = spm.attach_membranes(model, tokenizer, layers="attn+mlp", scope="image")
    trainer = spm.Trainer(model, tokenizer, membranes, train_config(model, tokenizer, lr=0.05, steps=3, batch_size=2))
    for _ in range(3):
        trainer.step()
    erased = all_logits(model, tokenizer, codes)
    assert not torch.allclose(erased, base)
    with membranes.disabled():
        assert torch.equal(all_logits(model, tokenizer, codes), base)
    assert membranes.state.enabled
    with pytest.raises(RuntimeError):
        with membranes.disabled():
            raise RuntimeError("boom")
    assert membranes.state.enabled
    assert torch.equal(all_logits(model, tokenizer, codes), erased)
    with membranes.disabled():  # nested switches restore the previous state, not a default
        with membranes.enabled():
            assert torch.equal(all_logits(model, tokenizer, codes), erased)
        assert not membranes.state.enabled


def test_multiplier_scales_the_delta_not_the_factors():
    model, tokenizer = tiny()
    membranes = spm.attach_membranes(model, tokenizer, scope="all")
    randomise(membranes)
    factors = {k: v.clone() for k, v in membranes.state_dict().items()}
    module = membranes.modules[membranes.names[0]]
    x = torch.randn(2, 3, module.base.in_features)
    base = module.base(x)
    full = module(x) - base
    with membranes.strength(0.25):
        quarter = module(x) - base
    with membranes.strength(0.0):
        assert torch.equal(module(x), base)
    torch.testing.assert_close(quarter, 0.25 * full, rtol=1e-5, atol=1e-6)
    assert all(torch.equal(factors[k], v) for k, v in membranes.state_dict().items())


@pytest.mark.parametrize("raise_inside", [False, True])
def test_strength_restores_the_previous_multiplier(raise_inside):
    model, tokenizer = tiny()
    membranes = spm.attach_membranes(model, tokenizer, scope="all")
    randomise(membranes)
    module = membranes.modules[membranes.names[0]]
    x = torch.randn(2, 3, module.base.in_features, generator=torch.Generator().manual_seed(0))
    membranes.state.multiplier = 0.5  # restored to what it was, not to a default of 1
    half = module(x)
    with membranes.strength(0.0):
        with pytest.raises(RuntimeError) if raise_inside else contextlib.nullcontext():
            with membranes.strength(2.0):
                assert not torch.equal(module(x), half)
                if raise_inside:
                    raise RuntimeError("boom")
        assert membranes.state.multiplier == 0.0 and torch.equal(module(x), module.base(x))
    assert membranes.state.multiplier == 0.5 and torch.equal(module(x), half)


# -----------------------------------------------------------------------------
# The one teacher-forced pass equals native generate, step by step


class Recorder(LogitsProcessor):
    """Records the raw [2B, V] scores that native generate computes before CFG."""

    def __init__(self):
        self.scores = []

    def __call__(self, input_ids, scores):
        self.scores.append(scores.clone())
        return scores


@pytest.mark.parametrize("membranes_on", [False, True])
@pytest.mark.parametrize("scope", ["image", "prompt", "prompt+image", "all"])
def test_teacher_forced_logits_equal_native_generate(membranes_on, scope):
    model, tokenizer = tiny()
    if membranes_on:
        randomise(spm.attach_membranes(model, tokenizer, layers="attn+mlp", scope=scope), seed=1)
    input_ids, cond, uncond, mask = prompt_batch(model, tokenizer)
    recorder = Recorder()
    codes = model.generate(input_ids=input_ids, attention_mask=mask, generation_mode="image", do_sample=False,
                           guidance_scale=5.0, logits_processor=LogitsProcessorList([recorder]))
    native = torch.stack(recorder.scores, 1).float()  # [2B, N, V]: conditional rows, then unconditional
    ours = all_logits(model, tokenizer, codes)
    assert native.shape == ours.shape
    torch.testing.assert_close(ours, native, rtol=0, atol=1e-4)
    # and our own KV-cached sampler picks the same greedy tokens
    assert torch.equal(spm.sample_codes(model, cond, uncond, mask, 5.0, 1.0, None), codes)


def test_padded_prompts_give_the_same_samples_as_alone():
    model, tokenizer = tiny()
    randomise(spm.attach_membranes(model, tokenizer, scope="image"))
    prompts = ["a mouse", "a photo of a cat"]  # different lengths: the first is left-padded in a batch
    together = spm.sample_prompts(model, tokenizer, prompts, [0, 1], 5.0, 1.0)
    for i, prompt in enumerate(prompts):
        torch.testing.assert_close(spm.sample_prompts(model, tokenizer, [prompt], [0, 1], 5.0, 1.0), together[i:i + 1],
                                   rtol=0, atol=0)


def test_a_right_padding_tokenizer_is_padded_on_the_left():
    """Converted tokenizers may pad on the right: a short prompt's one-pass logits and samples must not change when
    it shares a batch with a longer one, and the user's tokenizer keeps its setting."""
    model, tokenizer = tiny()
    tokenizer.padding_side = "right"
    randomise(spm.attach_membranes(model, tokenizer, scope="prompt"))
    prompts = ["a mouse", "a photo of a cat"]
    input_ids, cond, _, mask = prompt_batch(model, tokenizer, prompts)
    assert mask[0, 0] == 0 and input_ids[0, -1] == spm.special_ids(tokenizer)["boi"]
    codes = spm.sample_prompts(model, tokenizer, prompts, [0, 1, 2, 3], 5.0, 1.0)  # [2, 4, N]
    _, alone, _, alone_mask = prompt_batch(model, tokenizer, prompts[:1])
    with torch.no_grad():
        together = spm.image_logits(model, cond, mask, codes[:, 0])
        torch.testing.assert_close(spm.image_logits(model, alone, alone_mask, codes[:1, 0]), together[:1],
                                   rtol=0, atol=1e-5)
    torch.testing.assert_close(spm.sample_prompts(model, tokenizer, prompts[:1], [0, 1, 2, 3], 5.0, 1.0), codes[:1],
                               rtol=0, atol=0)
    assert tokenizer.padding_side == "right"


# -----------------------------------------------------------------------------
# Scope


def prompt_and_image_hidden(model, tokenizer, codes):
    _, cond, _, mask = prompt_batch(model, tokenizer)
    image = model.prepare_embeddings_for_image_generation(codes[:, :-1])
    full_mask = torch.cat([mask, mask.new_ones(mask.shape[0], codes.shape[1] - 1)], 1)
    with torch.no_grad():
        hidden = model.model.language_model(inputs_embeds=torch.cat([cond, image], 1), attention_mask=full_mask,
                                            use_cache=False).last_hidden_state
    T = mask.shape[1]
    return hidden[:, :T - 1], hidden[:, T - 1:]  # text-prompt positions, image positions (from <begin_of_image>)


def text_only_logits(model, tokenizer):
    batch = tokenizer(["<|User|>: a photo of a mouse\n\n<|Assistant|>:"], return_tensors="pt")
    with torch.no_grad():
        return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits


def membrane_deltas(membranes, run):
    """{module: [B, L] delta of each membrane at each position} over the forward passes of run()."""
    seen = {}

    def record(module, args, output):
        seen.setdefault(module.base, []).append(output - module.base(args[0]))

    hooks = [m.register_forward_hook(record) for m in membranes.modules.values()]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return seen


@pytest.mark.parametrize("scope,prompt_changes,text_changes", [("image", False, False), ("prompt", True, False),
                                                               ("prompt+image", True, False), ("all", True, True)])
def test_scope(scope, prompt_changes, text_changes):
    model, tokenizer = tiny()
    codes = codes_for(model, tokenizer)
    base_prompt, base_image = prompt_and_image_hidden(model, tokenizer, codes)
    base_text = text_only_logits(model, tokenizer)
    membranes = spm.attach_membranes(model, tokenizer, layers="attn+mlp", scope=scope)
    config = train_config(model, tokenizer, lr=0.05, steps=2, batch_size=2, scope=scope)
    trainer = spm.Trainer(model, tokenizer, membranes, config)
    trainer.step(), trainer.step()
    prompt_hidden, image_hidden = prompt_and_image_hidden(model, tokenizer, codes)
    assert torch.equal(prompt_hidden, base_prompt) != prompt_changes
    assert torch.equal(text_only_logits(model, tokenizer), base_text) != text_changes  # no image drawn: no prompt
    assert not torch.equal(image_hidden, base_image)  # the image always changes: directly, or through the prompt

    # Position by position, against a hand-built gate: generation starts AT <begin_of_image>, which predicts the
    # first image token. A gate one position off passes the checks above and native generate, which shares it.
    randomise(membranes)  # scope prompt leaves the last layer's q, o and MLP up factors at zero: no gradient
    input_ids, mask = spm.encode_prompts(tokenizer, PROMPTS)
    T, N = mask.shape[1], codes.shape[1]
    assert (input_ids[:, T - 1] == spm.special_ids(tokenizer)["boi"]).all()
    generation = torch.tensor([False] * (T - 1) + [True] * N)  # [T + N - 1]: the prompt, then <boi> and the image
    expected = {"image": generation, "prompt": ~generation, "prompt+image": torch.ones_like(generation),
                "all": torch.ones_like(generation)}[scope]
    deltas = membrane_deltas(membranes, lambda: prompt_and_image_hidden(model, tokenizer, codes))
    assert len(deltas) == len(membranes.names)
    for (delta,) in deltas.values():
        assert torch.equal(delta.ne(0).any(-1), expected.expand(len(PROMPTS), -1))


def test_prompt_scope_leaves_image_positions_untouched():
    """With scope prompt the membranes never act at image positions: with the prompt's keys and values held
    fixed (the same prompt hidden states), the image positions compute exactly as the base model's."""
    model, tokenizer = tiny()
    codes = codes_for(model, tokenizer)
    membranes = spm.attach_membranes(model, tokenizer, layers="attn+mlp", scope="prompt")
    randomise(membranes)
    seen = membrane_deltas(membranes, lambda: prompt_and_image_hidden(model, tokenizer, codes))
    T = spm.encode_prompts(tokenizer, PROMPTS)[1].shape[1]
    for deltas in seen.values():
        delta = deltas[0]
        assert torch.count_nonzero(delta[:, T - 1:]) == 0  # image positions: no delta at all
        assert torch.count_nonzero(delta[:, :T - 1]) > 0  # prompt positions: the membrane acts


# -----------------------------------------------------------------------------
# Module selection


@pytest.mark.parametrize("layers,modules,attn_ids,mlp_ids,expected", [
    ("attn", None, None, None, {(i, m) for i in range(2) for m in spm.ATTN_MODULES}),
    ("mlp", None, "1", None, {(i, m) for i in range(2) for m in spm.MLP_MODULES}),
    ("attn+mlp", None, "0", "1", {(0, m) for m in spm.ATTN_MODULES} | {(1, m) for m in spm.MLP_MODULES}),
    ("attn+mlp", ["q_proj", "down_proj"], "1", "0-1", {(1, "q_proj"), (0, "down_proj"), (1, "down_proj")}),
])
def test_module_selection_wraps_exactly_the_named_modules(layers, modules, attn_ids, mlp_ids, expected):
    model, tokenizer = tiny()
    membranes = spm.attach_membranes(model, tokenizer, layers, modules, attn_ids, mlp_ids, scope="all")
    wrapped = {(int(n.split(".")[3]), n.split(".")[-1]) for n, m in model.named_modules()
               if isinstance(m, spm.MembraneLinear)}
    assert wrapped == expected
    assert {(int(n.split(".")[3]), n.split(".")[-1]) for n in membranes.names} == expected


@pytest.mark.parametrize("spec,expected", [("0-5,9", [0, 1, 2, 3, 4, 5, 9]), ("3", [3]), ("all", list(range(12))),
                                           (None, list(range(12))), ("2-3,3", [2, 3])])
def test_parse_layer_ids(spec, expected):
    assert spm.parse_layer_ids(spec, 12) == expected


@pytest.mark.parametrize("spec", ["12", "0-12", "-1", "a-b", ""])
def test_parse_layer_ids_rejects(spec):
    with pytest.raises(spm.SPMError):
        spm.parse_layer_ids(spec, 12)


# -----------------------------------------------------------------------------
# Training


@pytest.mark.parametrize("loss", ["kl", "mse"])
@pytest.mark.parametrize("loss_on", ["cond", "cfg"])
def test_steps_lower_the_loss_on_a_fixed_rollout_and_only_membranes_change(loss, loss_on):
    model, tokenizer = tiny()
    base_params = {n: p.clone() for n, p in model.named_parameters()}
    membranes = spm.attach_membranes(model, tokenizer, layers="attn", scope="image")
    args = train_config(model, tokenizer, loss=loss, loss_on=loss_on, lr=0.02, warmup=0, steps=30, batch_size=2, anchor="none")
    trainer = spm.Trainer(model, tokenizer, membranes, args)
    trainer.step_count = 0
    losses = []
    for _ in range(6):
        step = trainer.step_count
        losses.append(trainer.step()["erase"])
        trainer.step_count = step  # the same prompts and rollout seeds every step
    assert losses[-1] < losses[0] * 0.9, losses
    membrane_ids = {id(p) for p in membranes.parameters()}
    for name, p in model.named_parameters():
        if id(p) in membrane_ids:
            continue
        key = name.replace(".base.", ".")
        assert torch.equal(p, base_params[key]), name
    assert any(not torch.equal(m.up.weight, torch.zeros_like(m.up.weight)) for m in membranes.modules.values())


@pytest.mark.parametrize("anchor", ["latent", "prompts"])
def test_anchoring_adds_a_loss_term(anchor):
    model, tokenizer = tiny()
    membranes = spm.attach_membranes(model, tokenizer, scope="image")
    config = train_config(model, tokenizer, anchor=anchor, lr=0.05, batch_size=2)
    trainer = spm.Trainer(model, tokenizer, membranes, config)
    first, second = trainer.step(), trainer.step()
    assert first["anchor"] == 0.0  # fresh membranes: the student is the teacher
    assert second["anchor"] > 0.0
    assert second["loss"] == pytest.approx(second["erase"] + config.anchor_weight * second["anchor"], rel=1e-6)


def test_anchor_none_adds_no_anchor_term_and_no_rows():
    """A Trainer given anchor none trains the erasure alone: no anchor rows in the batch (they were once the concept
    rows themselves, held to the teacher against the erasure), no anchor term in the loss."""
    model, tokenizer = tiny()
    membranes = spm.attach_membranes(model, tokenizer, scope="image")
    trainer = spm.Trainer(model, tokenizer, membranes, train_config(model, tokenizer, anchor="none", batch_size=2))
    batch = spm.Batch(trainer, trainer.pick(["mouse"], "concept"))
    assert list(batch.rows) == ["concept", "surrogate"] and batch.input_ids.shape[0] == 2 and trainer.levers == []
    metrics = trainer.step()
    assert "anchor" not in metrics and metrics["loss"] == metrics["erase"]


def test_anchor_vocabulary_holds_the_tokenizers_own_words_to_the_teacher_and_resumes():
    """--anchor-vocabulary N: its rows are prompts of the tokenizer's words (never the concept or a listed anchor),
    sampled on their own noise stream, held to the teacher with the anchor weight; the words travel with --resume."""
    model, tokenizer = tiny()
    membranes = spm.attach_membranes(model, tokenizer, scope="prompt")
    config = train_config(model, tokenizer, anchor_vocabulary=8, batch_size=2, lr=0.05)
    trainer = spm.Trainer(model, tokenizer, membranes, config)
    vocab = trainer.levers[-1]
    assert [lever.name for lever in trainer.levers] == ["anchor", "vocab"] and vocab.weight == config.anchor_weight
    words, left_out = spm.vocabulary_anchors(trainer, 8)
    pool = set(spm.tokenizer_words(tokenizer)) - {"mouse", "cat", "car"}
    assert len(words) + len(left_out) == 8 and set(words) | set(left_out) <= pool and not set(words) & set(left_out)
    assert spm.vocabulary_anchors(trainer, 8) == (words, left_out)  # a seeded draw
    assert set(sum(spm.vocabulary_anchors(trainer, 1000), [])) == pool  # all of them, when N is large enough
    assert "dog" not in sum(spm.vocabulary_anchors(trainer, 1000, exclude=["dog"]), [])
    batch = spm.Batch(trainer, trainer.pick(config.concept, "concept"))
    rows = batch.rows["vocab"]
    assert rows == spm.Rows(4, 6, codes="vocab") and vocab.words == words
    assert set(batch.prompts[4:6]) <= {t.format(w) for w in words for t in config.templates}
    first, second = trainer.step(), trainer.step()
    assert first["vocab"] == 0.0 and second["vocab"] > 0.0
    assert second["loss"] == pytest.approx(second["erase"] + config.anchor_weight * (second["anchor"] + second["vocab"]),
                                           rel=1e-6)
    resumed = spm.Trainer(model, tokenizer, membranes, config)
    resumed.load_state_dict(trainer.state_dict())
    assert (resumed.levers[-1].words, resumed.levers[-1].left_out) == (words, left_out)
    assert spm.Config.from_dict(config.to_dict()).anchor_vocabulary == 8


def test_ema_publishes_the_bias_corrected_average_of_the_steps_and_resumes(tmp_path):
    """--ema D: checkpoints (and grids) hold sum_i (1-D) D^(t-i) w_i / (1 - D^t) over the iterates w_1..w_t; the
    membranes train on their raw weights, which the trainer state keeps, and a resumed run publishes the same."""
    from safetensors.torch import load_file

    def trainer():
        model, tokenizer = tiny()
        membranes = spm.attach_membranes(model, tokenizer, scope="prompt")
        return spm.Trainer(model, tokenizer, membranes, train_config(model, tokenizer, ema=0.5, batch_size=2,
                                                                     lr=0.05, warmup=1, steps=3))

    straight, iterates = trainer(), []
    assert [lever.name for lever in straight.levers] == ["anchor", "ema"]
    for _ in range(3):
        straight.step()
        iterates.append(straight.membranes.state_dict())
    with straight.published():
        published = straight.membranes.state_dict()
    raw = straight.membranes.state_dict()
    for key in raw:
        expected = sum(0.5 * 0.5 ** (2 - i) * w[key] for i, w in enumerate(iterates)) / (1 - 0.5 ** 3)
        assert torch.allclose(published[key], expected, rtol=1e-6, atol=1e-8), key
        assert torch.equal(raw[key], iterates[-1][key]), key  # restored after the block
    assert any(not torch.equal(published[k], raw[k]) for k in raw)
    spm.save_run(tmp_path, straight)
    saved, state = load_file(tmp_path / spm.CHECKPOINT_NAME), spm.load_trainer_state(tmp_path / spm.STATE_NAME)
    assert all(torch.equal(saved[k], published[k]) and torch.equal(state["membranes"][k], raw[k]) for k in raw)
    interrupted = trainer()
    interrupted.step(), interrupted.step()
    resumed = trainer()
    resumed.load_state_dict(interrupted.state_dict())
    resumed.step()
    with resumed.published():
        assert all(torch.equal(resumed.membranes.state_dict()[k], published[k]) for k in raw)


def test_select_every_publishes_the_membranes_of_the_lowest_held_out_score():
    """--select-every K scores the membranes every K steps on prompts drawn as at steps training never reaches,
    teacher-forced on the teacher's pictures: erasure divergence + anchor weight * anchor KL; checkpoints publish the
    lowest-scoring membranes, not the last, and the choice travels with --resume."""
    model, tokenizer = tiny()
    membranes = spm.attach_membranes(model, tokenizer, scope="prompt")
    config = train_config(model, tokenizer, select_every=2, steps=6, batch_size=2, augment=1.0, lr=0.05)
    trainer = spm.Trainer(model, tokenizer, membranes, config)
    selection = trainer.levers[-1]
    assert [lever.name for lever in trainer.levers] == ["anchor", "select"]
    held_out = [spm.held_out_batch(trainer, -1 - k) for k in range(spm.VALIDATION_DRAWS)]
    with trainer.drawing_at(-1):
        assert held_out[0][0].picks == trainer.pick(config.concept, "concept")
    assert trainer.drawn_step is None and held_out[0][0].picks != trainer.pick(config.concept, "concept")
    batch, codes, teacher = held_out[0]
    assert list(codes) == ["concept", "anchor"] and batch.rows["anchor"] == spm.Rows(2, 4, codes="anchor")
    with torch.no_grad():  # untouched membranes are the teacher: no anchor term, the teacher's own erasure term
        untouched = spm.validation_loss(trainer, batch, codes, teacher)
        target = spm.erasure_target(teacher["concept"], teacher["surrogate"], config.eta)
        assert float(untouched) == pytest.approx(float(spm.divergence(teacher["concept"], target)), rel=1e-6)
        randomise(membranes, seed=1, scale=0.3)
        anchor_kl = spm.divergence(trainer.distributions(batch, codes, ["anchor"])["anchor"], teacher["anchor"])
        moved = spm.validation_loss(trainer, batch, codes, teacher)
        student = trainer.distributions(batch, codes, ["concept"])["concept"]
        assert float(moved) == pytest.approx(float(spm.divergence(student, target) + 3.0 * anchor_kl), rel=1e-5)
    states, scores = [], []
    for seed in range(3):
        randomise(membranes, seed=seed, scale=0.3)
        states.append(membranes.state_dict())
        with torch.no_grad():
            scores.append(sum(float(spm.validation_loss(trainer, *d)) for d in held_out) / len(held_out))
    best, middle, worst = sorted(range(3), key=scores.__getitem__)
    for step, candidate in zip((2, 4, 6), (middle, best, worst)):
        membranes.load_state_dict(states[candidate])
        trainer.step_count = step
        assert trainer.levers[-1].updated(trainer) == {"validation": pytest.approx(scores[candidate], rel=1e-6),
                                                       "selected_step": 2 if candidate == middle else 4}
    trainer.step_count = 5
    assert selection.updated(trainer) == {}  # not a multiple of K, not the last step
    with trainer.published():
        assert all(torch.equal(membranes.state_dict()[k], v) for k, v in states[best].items())
    assert all(torch.equal(membranes.state_dict()[k], v) for k, v in states[worst].items())
    resumed = spm.Trainer(model, tokenizer, membranes, config)
    resumed.load_state_dict(trainer.state_dict())
    with resumed.published():
        assert all(torch.equal(membranes.state_dict()[k], v) for k, v in states[best].items())
    fresh = spm.Trainer(model, tokenizer, spm.attach_membranes(tiny()[0], tokenizer, scope="prompt"), config)
    logged = [fresh.step() for _ in range(3)]
    assert ["validation" in m for m in logged] == [False, True, False] and logged[1]["selected_step"] == 2


def test_a_trainer_refuses_an_unresolved_config():
    model, tokenizer = tiny()
    membranes = spm.attach_membranes(model, tokenizer, scope="image")
    with pytest.raises(spm.SPMError, match="resolved Config"):
        spm.Trainer(model, tokenizer, membranes, spm.Config(model="tiny", concept="mouse"))
    resolved = spm.Config(model="tiny", concept="mouse").resolved(model, tokenizer)
    assert resolved.anchor == "prompts" and "mouse" not in resolved.anchor_prompts and "cat" in resolved.anchor_prompts
    assert (resolved.cfg, resolved.temperature, resolved.templates) == (5.0, 1.0, list(spm.DEFAULT_TEMPLATES))
    assert resolved.sample_prompts == ["a mouse", "a person", "a cat", "a dog"]


def test_a_lever_plugs_in_without_touching_the_step():
    """A lever adds its rows to the step's batch (sampled, with teacher and student logits) and its loss term; the
    step sums the terms with their weights and logs each by name."""
    model, tokenizer = tiny()
    membranes = spm.attach_membranes(model, tokenizer, scope="image")
    randomise(membranes)
    seen = {}

    class KeepTrees(spm.Lever):
        name, weight, stream = "trees", 0.5, 7

        def prompts(self, trainer, picks):
            return ["a tree"] * len(picks)

        def loss(self, trainer, step):
            seen["rows"], seen["codes"] = step.batch.rows[self.name], step.codes[self.name]
            return spm.divergence(step.student[self.name], step.teacher[self.name])

    config = train_config(model, tokenizer, anchor="none", batch_size=2)
    trainer = spm.Trainer(model, tokenizer, membranes, config, levers=[KeepTrees()])
    batch = spm.Batch(trainer, trainer.pick(config.concept, "concept"))  # what the first step will tokenise
    rows = slice(2, 4)  # its rows come after the concept's; their rollout noise is its own stream of indices
    expected = spm.sample_codes(model, batch.cond[rows], batch.uncond[rows], batch.mask[rows], config.cfg,
                                config.temperature, spm.rollout_uniforms(config.seed, 0, 7, 2, 64))
    metrics = trainer.step()
    assert seen["rows"] == spm.Rows(2, 4, codes="trees") and torch.equal(seen["codes"], expected)
    assert metrics["trees"] > 0 and metrics["loss"] == pytest.approx(metrics["erase"] + 0.5 * metrics["trees"])


@pytest.mark.parametrize("settings,needle", [
    (dict(concept=""), "--concept is empty"), (dict(surrogate="mouse"), "--surrogate"),
    (dict(anchor="prompts"), "--anchor-prompts"), (dict(modules="foo_proj"), "foo_proj"),
    (dict(rank=0), "--rank 0 must be at least 1"), (dict(steps=-3), "--steps -3"), (dict(batch_size=0), "--batch-size"),
    (dict(scope="text"), "--scope 'text': choose from prompt, image, prompt+image, all"), (dict(augment=2), "--augment"),
    (dict(lr=0), "--lr"), (dict(templates=["a photo"]), "exactly one {}"), (dict(rollout="target", surrogate="real mouse"),
                                                                              "--rollout target"),
    (dict(save_every=-1), "--save-every"), (dict(adversarial_tokens=0), "--adversarial-tokens"),
    (dict(ema=1), "--ema 1 is a decay"), (dict(ema=0.9, select_every=5), "--ema and --select-every"),
    (dict(adversarial_anchors=2, anchor="latent"), "--adversarial-anchors draws the anchors' pictures"),
    (dict(adversarial_anchors=2, adversarial_anchors_from="vocabulary"), "--adversarial-anchors-from vocabulary draws"),
    (dict(anchor_vocabulary=8, adversarial_anchors_from="vocabulary"), "--adversarial-anchors-from vocabulary draws"),
    (dict(avoid=["cat", "mouse"]), "--avoid 'mouse' is a concept this run erases"),
    (dict(latent_positions="image"), "--latent-positions image says where --latent-eps attacks: add --latent-eps")])
def test_config_validates_once_with_one_line_errors(settings, needle):
    with pytest.raises(spm.SPMError, match=re.escape(needle)) as error:
        spm.Config(**{"concept": "mouse", **settings})
    assert error.value.exit_code == 2 and "\n" not in str(error.value)


def test_config_round_trips_and_the_command_line_is_made_from_it(tmp_path):
    config = spm.Config(model="tiny", concept=[" mouse "], modules="q_proj, v_proj", anchor_prompts=["cat", " "])
    assert config.concept == ["mouse"] and config.modules == ["q_proj", "v_proj"] and config.anchor_prompts == ["cat"]
    assert config.out == os.path.join("runs", "mouse")
    assert spm.Config.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert spm.Config.from_dict({**config.to_dict(), "resume": None, "world_size": 2}) == config  # older checkpoints
    flags = {a.dest for a in spm.build_parser()._actions} - {"help", "resume", "overwrite"}
    assert flags == {f.name for f in dataclasses.fields(spm.Config)}
    (tmp_path / "t.txt").write_text("a {}\n\nthe {} here\n")
    args = spm.build_parser().parse_args(["--concept", "cat", "--templates", str(tmp_path / "t.txt"), "--rank", "2"])
    assert spm.config_from_args(args) == spm.Config(concept="cat", templates=["a {}", "the {} here"], rank=2)


def test_every_sample_of_a_batch_has_its_own_randomness():
    """Seeds come from (seed, step, global sample index): two samples of one batch draw differently, and a sample
    draws the same whichever batch or process it lands in."""
    uniforms = spm.rollout_uniforms(0, 3, 0, 4, 64)
    assert all(not torch.equal(uniforms[i], uniforms[j]) for i in range(4) for j in range(i))
    assert torch.equal(spm.rollout_uniforms(0, 3, 2, 2, 64), uniforms[2:])
    model, tokenizer = tiny()
    membranes = spm.attach_membranes(model, tokenizer, scope="image")
    config = train_config(model, tokenizer, batch_size=4, concept=list(spm.COMMON_CONCEPTS))
    whole = spm.Trainer(model, tokenizer, membranes, config)
    second_half = spm.Trainer(model, tokenizer, membranes, train_config(model, tokenizer, batch_size=2,
                                                                        concept=config.concept), first_index=2)
    picks = whole.pick(config.concept, "concept")
    assert len(set(picks)) > 1, picks  # one pick for all would be the sample index left out of the seed
    assert second_half.pick(config.concept, "concept") == picks[2:]
    draws = [torch.rand(8, generator=whole.generator(i, "latent")) for i in range(2)]
    assert not torch.equal(*draws)


def test_latent_anchor_embeddings_are_norm_matched():
    generator = torch.Generator().manual_seed(0)
    embeds = torch.randn(2, 5, 64)
    anchors = spm.latent_anchor_embeds(embeds, [[1, 2], [4]], generator)
    changed = {(0, 1), (0, 2), (1, 4)}
    for r in range(2):
        for c in range(5):
            if (r, c) in changed:
                ratio = anchors[r, c].norm() / embeds[r, c].norm()
                assert 0.8 <= ratio <= 1.2 and not torch.equal(anchors[r, c], embeds[r, c])
            else:
                assert torch.equal(anchors[r, c], embeds[r, c])


# Two rows of two-token distributions, as logits shifted by a different constant each (softmax must ignore it).
P_STUDENT, P_TARGET = [[0.5, 0.5], [0.8, 0.2]], [[0.25, 0.75], [0.5, 0.5]]


def kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q))


@pytest.mark.parametrize("shape", [(1, 2, 2), (2, 1, 2)])  # the mean runs over rows and image steps alike
@pytest.mark.parametrize("loss,direction,expected", [
    ("kl", "forward", (kl(P_TARGET[0], P_STUDENT[0]) + kl(P_TARGET[1], P_STUDENT[1])) / 2),  # KL(target || student)
    ("kl", "reverse", (kl(P_STUDENT[0], P_TARGET[0]) + kl(P_STUDENT[1], P_TARGET[1])) / 2),  # KL(student || target)
    ("mse", "forward", ((3 - 1) ** 2 + (1 - 2) ** 2 + (0 - 4) ** 2 + (2 + 1) ** 2) / 4),
])
def test_divergence_against_hand_computed_values(shape, loss, direction, expected):
    if loss == "mse":  # on the raw logits: a shift counts
        student, target = torch.tensor([[3.0, 1.0], [0.0, 2.0]]), torch.tensor([[1.0, 2.0], [4.0, -1.0]])
    else:
        student = torch.tensor(P_STUDENT).log() + torch.tensor([[3.0], [-1.0]])
        target = torch.tensor(P_TARGET).log() + torch.tensor([[-2.0], [0.5]])
    got = spm.divergence(student.view(shape), target.view(shape), loss, direction)
    assert got.shape == () and math.isclose(got.item(), expected, rel_tol=1e-6)


@pytest.mark.parametrize("eta,expected", [(0.0, [0.5, -1.0, 0.0]), (1.0, [0.0, -4.0, -1.0]), (2.0, [-0.5, -7.0, -2.0])])
def test_erasure_target_by_hand(eta, expected):
    """t = s - eta (c - s), for concept logits c and surrogate logits s."""
    concept, surrogate = torch.tensor([1.0, 2.0, 1.0]), torch.tensor([0.5, -1.0, 0.0])
    assert torch.equal(spm.erasure_target(concept, surrogate, eta), torch.tensor(expected))


def trainer_target(eta, surrogate):
    """(the target the trainer's first step trains towards, teacher concept logits, teacher surrogate logits), the
    latter two computed here from the step's picks and rollout with the membranes off."""
    model, tokenizer = tiny()
    membranes = spm.attach_membranes(model, tokenizer, layers="attn+mlp", scope="all")
    randomise(membranes)  # the student differs from the teacher: a target taken from the student would show
    trainer = spm.Trainer(model, tokenizer, membranes, train_config(model, tokenizer, eta=eta, surrogate=surrogate, anchor="none",
                                                                  batch_size=2))
    picks = trainer.pick(trainer.config.concept, "concept")
    targets, divergence = [], spm.divergence
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(spm, "divergence",
                      lambda student, target, *rest: targets.append(target) or divergence(student, target, *rest))
        trainer.step()
    # the rows the trainer tokenises together: concept prompts, then the surrogate in the same templates
    prompts = [t.format(c) for c, t in picks] + [t.format(surrogate) for _, t in picks if surrogate]
    input_ids, mask = spm.encode_prompts(tokenizer, prompts)
    surrogate_rows = (input_ids[2:], mask[2:]) if surrogate else (spm.unconditional_ids(input_ids, tokenizer), mask)
    embed, codes = model.get_input_embeddings(), trainer.cached_rollout[1]["concept"]
    with torch.no_grad(), membranes.disabled():
        concept = spm.image_logits(model, embed(input_ids[:2]), mask[:2], codes)
        surrogate_logits = spm.image_logits(model, embed(surrogate_rows[0]), surrogate_rows[1], codes)
    return targets[0], concept, surrogate_logits


def test_target_with_eta_zero_and_empty_surrogate_is_the_unconditional_logits():
    """The empty surrogate is the all-pad prompt of the concept prompt's length, as CFG's unconditional prompt."""
    target, concept, unconditional = trainer_target(0.0, "")
    assert not torch.allclose(concept, unconditional, atol=1e-3)
    torch.testing.assert_close(target, unconditional, rtol=0, atol=1e-6)
    _, tokenizer = tiny()
    input_ids, _ = spm.encode_prompts(tokenizer, ["a photo of a mouse"])
    uncond = spm.unconditional_ids(input_ids, tokenizer)
    ids = spm.special_ids(tokenizer)
    assert uncond.shape == input_ids.shape
    assert uncond[0, 0] == ids["bos"] and uncond[0, -1] == ids["boi"]
    assert (uncond[0, 1:-1] == ids["pad"]).all()


@pytest.mark.parametrize("surrogate", ["", "real mouse"])
@pytest.mark.parametrize("eta", [0.0, 1.0, 2.0])
def test_the_trainer_trains_towards_the_erasure_target(eta, surrogate):
    target, concept, surrogate_logits = trainer_target(eta, surrogate)
    torch.testing.assert_close(target, surrogate_logits - eta * (concept - surrogate_logits), rtol=0, atol=1e-6)


# -----------------------------------------------------------------------------
# Checkpoints


def test_checkpoint_round_trip_into_a_fresh_model(tmp_path):
    model, tokenizer = tiny()
    membranes = spm.attach_membranes(model, tokenizer, layers="attn+mlp", attn_layer_ids="1", scope="image")
    randomise(membranes)
    config = spm.Config(model="tiny", concept="mouse", layers="attn+mlp", attn_layer_ids="1")
    spm.save_membranes(tmp_path / "m.safetensors", membranes, config, step=7)
    codes = codes_for(model, tokenizer)
    expected = all_logits(model, tokenizer, codes)

    fresh, fresh_tokenizer = tiny()
    loaded, metadata = spm.load_membranes(tmp_path / "m.safetensors", fresh, fresh_tokenizer)
    assert torch.equal(all_logits(fresh, fresh_tokenizer, codes), expected)
    assert metadata["config"]["layers"] == "attn+mlp" and metadata["config"]["concept"] == ["mouse"]
    assert metadata["modules"] == membranes.names and metadata["step"] == "7"
    assert metadata["model"] == "tiny" and metadata["scope"] == "image" and metadata["rank"] == "1"
    assert set(metadata["config"]) == {f.name for f in dataclasses.fields(spm.Config)}
    assert spm.Config.from_dict(metadata["config"]) == spm.Config(model="tiny", concept="mouse", layers="attn+mlp",
                                                                  attn_layer_ids="1")


def test_resume_needs_no_global_rng_state(tmp_path):
    """Every draw of a step comes from generators seeded by (seed, step, sample), so the trainer state holds no RNG
    state: wherever the global generators stand, a resumed trainer repeats the uninterrupted one bit for bit."""
    import random

    def trainer():
        model, tokenizer = tiny()
        membranes = spm.attach_membranes(model, tokenizer, layers="attn+mlp", scope="image")
        return spm.Trainer(model, tokenizer, membranes, train_config(model, tokenizer, lr=0.05, warmup=1, steps=2, batch_size=2,
                                                                   anchor="latent"))

    def step(trainer, global_seed):
        torch.manual_seed(global_seed), random.seed(global_seed)
        return trainer.step()

    straight = trainer()
    expected = [step(straight, 1) for _ in range(2)]
    interrupted = trainer()
    step(interrupted, 2)
    torch.save(interrupted.state_dict(), tmp_path / spm.STATE_NAME)
    state = spm.load_trainer_state(tmp_path / spm.STATE_NAME)
    assert set(state) == {"membranes", "optimizer", "scheduler", "step", "levers"}
    resumed = trainer()
    resumed.load_state_dict(state)
    last = step(resumed, 3)
    assert (last["loss"], last["lr"]) == (expected[-1]["loss"], expected[-1]["lr"])
    for key, value in straight.membranes.state_dict().items():
        assert torch.equal(resumed.membranes.state_dict()[key], value), key


def test_on_top_trains_against_a_teacher_that_carries_the_earlier_membranes_and_resumes(tmp_path, capsys):
    """--on-top A: A's membranes are loaded frozen and on and the run's own attached after them, so the teacher (the
    run's own off) is the model with A. The run trains what a Trainer built by hand on a model carrying A trains, not
    what it trains alone; A's stay as saved; a resumed run repeats the uninterrupted one; loading the run without A
    says so."""
    common = dict(model="tiny", adversarial="none", augment=0.0, batch_size=2, sample_every=0, lr=0.05, warmup=1,
                  anchor_prompts=["cat", "car"])
    first = spm.train(spm.Config(concept="dog", steps=2, out=str(tmp_path / "a"), **common))
    stacked = spm.train(spm.Config(concept="mouse", steps=2, on_top=[first.out], out=str(tmp_path / "b"), **common))
    alone = spm.train(spm.Config(concept="mouse", steps=2, out=str(tmp_path / "alone"), **common))
    spm.train(spm.Config(concept="mouse", steps=1, on_top=[first.out], out=str(tmp_path / "r"), **common))
    spm.train(spm.Config(concept="mouse", steps=2, on_top=[first.out], out=str(tmp_path / "r"), **common), resume=True)
    saved = {name: spm.read_checkpoint(tmp_path / name)[0] for name in ("a", "b", "alone", "r")}
    assert stacked.on_top == [first.out] and spm.read_checkpoint(tmp_path / "b")[1]["config"]["on_top"] == [first.out]
    model, tokenizer = tiny()
    beneath, _ = spm.load_membranes(tmp_path / "a", model, tokenizer)
    membranes = spm.attach_for(model, tokenizer, stacked)
    trainer = spm.Trainer(model, tokenizer, membranes, stacked)
    for _ in range(2):
        trainer.step()
    mine = membranes.state_dict()
    assert all(torch.equal(mine[k], saved["b"][k]) and torch.equal(saved["r"][k], saved["b"][k]) for k in mine)
    assert not all(torch.equal(saved["alone"][k], saved["b"][k]) for k in mine)
    assert all(torch.equal(beneath.state_dict()[k], v) for k, v in saved["a"].items())  # frozen
    membranes.detach(), beneath.detach()
    for paths, noted in (([tmp_path / "b"], True), ([tmp_path / "a", tmp_path / "b"], False)):
        for loaded, _ in inference.load_all_membranes(paths, model, tokenizer)[::-1]:
            loaded.detach()
        assert ("was trained on top of" in capsys.readouterr().err) == noted


@pytest.mark.parametrize("where,needle", [("missing", "no membranes.safetensors there"),
                                          ("own", "is this run's own --out"), ("scope", "share the scope")])
def test_on_top_names_a_bad_run_directory_in_one_line_before_writing_anything(tmp_path, where, needle):
    common = dict(model="tiny", adversarial="none", augment=0.0, batch_size=2, sample_every=0, steps=1)
    spm.train(spm.Config(concept="dog", out=str(tmp_path / "a"), scope="image", **common))
    beneath = {"missing": tmp_path / "nothing", "own": tmp_path / "b", "scope": tmp_path / "a"}[where]
    with pytest.raises(spm.SPMError, match=re.escape(needle)) as error:
        spm.train(spm.Config(concept="mouse", on_top=[str(beneath)], out=str(tmp_path / "b"), **common))
    assert "\n" not in str(error.value) and not (tmp_path / "b").exists()


def test_checkpoint_for_another_model_is_rejected(tmp_path):
    model, tokenizer = tiny()
    membranes = spm.attach_membranes(model, tokenizer, scope="image")
    path = tmp_path / "m.safetensors"
    spm.save_membranes(path, membranes, RUN, step=1)
    from transformers import JanusForConditionalGeneration
    wider = JanusForConditionalGeneration(spm.janus_config(len(tokenizer), hidden=32, heads=2))
    with pytest.raises(spm.SPMError, match="another model"):
        spm.load_membranes(path, wider, tokenizer)
    deeper = JanusForConditionalGeneration(spm.janus_config(len(tokenizer), layers=1))
    with pytest.raises(spm.SPMError, match="another model"):
        spm.load_membranes(path, deeper, tokenizer)


@pytest.mark.parametrize("change,key", [({"codebook": 128}, "codebook_size"), ({"grid": 4}, "num_image_tokens")])
def test_checkpoint_for_a_model_of_the_same_linears_is_rejected_by_its_signature(tmp_path, change, key):
    """Another image vocabulary or image size leaves every wrapped Linear's shape as it is: only the model
    signature in the metadata tells the models apart."""
    model, tokenizer = tiny()
    membranes = spm.attach_membranes(model, tokenizer, layers="attn+mlp", scope="image")
    spm.save_membranes(tmp_path / "m.safetensors", membranes, RUN, step=1)
    from transformers import JanusForConditionalGeneration
    config = spm.janus_config(len(tokenizer), image_token_id=model.config.image_token_id, **change)
    other = JanusForConditionalGeneration(config).eval()
    twin = spm.attach_membranes(other, tokenizer, layers="attn+mlp", scope="image")
    assert {k: v.shape for k, v in twin.state_dict().items()} == {k: v.shape for k, v in membranes.state_dict().items()}
    twin.detach()
    with pytest.raises(spm.SPMError, match="made for another model") as error:
        spm.load_membranes(tmp_path / "m.safetensors", other, tokenizer)
    assert key in str(error.value) and "\n" not in str(error.value)
    assert not any(isinstance(m, spm.MembraneLinear) for m in other.modules())


# -----------------------------------------------------------------------------
# Command line, end to end


def run_cli(*argv, cwd=HERE):
    return subprocess.run([sys.executable, *argv], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_cli_train_then_sample_compare(tmp_path):
    out = tmp_path / "run"
    result = run_cli("spm_janus.py", "--model", "tiny", "--concept", "mouse", "--layers", "attn", "--loss", "kl",
                     "--steps", "4", "--batch-size", "2", "--lr", "0.05", "--sample-every", "2", "--out", str(out))
    assert result.returncode == 0, result.stderr
    from safetensors import safe_open
    with safe_open(str(out / "membranes.safetensors"), framework="pt") as f:
        keys, metadata = list(f.keys()), f.metadata()
    assert keys and all(k.endswith((".down", ".up")) and ".self_attn." in k for k in keys)
    assert json.loads(metadata["config"])["steps"] == 4 and metadata["step"] == "4"
    assert sorted(p.name for p in (out / "samples").glob("*.png")) == \
        ["step_000000.png", "step_000002.png", "step_000004.png"]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 4
    import sample
    n = 2
    for strength in ("1", "0"):  # in-process, to spare a Python start each; sample.py's command line runs below
        sample.main(["--ckpt", str(out / "membranes.safetensors"), "--prompt", "a mouse", "--prompt", "a cat",
                     "--compare", "--n", str(n), "--strength", strength, "--out", str(tmp_path / strength)])
        mouse, cat = compare_cells(tmp_path / strength / "compare.png", rows=2, columns=2 * n)
        for seed in range(n):  # columns: base seed 0 .. n-1, then erased seed 0 .. n-1
            if strength == "1":
                assert not torch.equal(mouse[seed], mouse[n + seed]), seed
            else:  # the same seeds through the base model
                assert torch.equal(mouse[seed], mouse[n + seed]) and torch.equal(cat[seed], cat[n + seed]), seed


def compare_cells(path, rows, columns):
    """The picture cells of a grid written by spm.image_grid with column labels, [rows][columns] of uint8 tensors."""
    import numpy as np
    from PIL import Image
    pixels = torch.from_numpy(np.array(Image.open(path).convert("RGB")))
    label_width, header, cell = 170, 14, 128
    assert pixels.shape[:2] == (header + rows * (cell + 2), label_width + columns * (cell + 2))

    def at(r, c):
        y, x = header + r * (cell + 2), label_width + c * (cell + 2)
        return pixels[y:y + cell, x:x + cell]

    return [[at(r, c) for c in range(columns)] for r in range(rows)]


def test_sample_without_checkpoint_on_tiny(tmp_path):
    result = run_cli("sample.py", "--model", "tiny", "--prompt", "a cat", "--n", "1", "--out", str(tmp_path / "s"))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "s" / "samples.png").stat().st_size > 0


@pytest.mark.parametrize("argv,needle", [
    (["--modules", "q_proj,foo_proj"], "foo_proj"),
    (["--attn-layer-ids", "0-7"], "out of range"),
    (["--layers", "mlp", "--mlp-layer-ids", "2"], "out of range"),
    (["--rank", "0"], "--rank"),
    (["--steps", "0"], "--steps"),
])
def test_cli_bad_input_is_one_line(tmp_path, argv, needle, capsys):
    code = main_exit_code(spm.main, ["--model", "tiny", "--concept", "mouse", "--out", str(tmp_path / "r"), *argv])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and needle in lines[0] and "Traceback" not in lines[0], lines


def main_exit_code(main, argv):
    """Run a script's main() in this process (a Python start costs seconds): its exit code, 0 without SystemExit."""
    try:
        main(argv)
    except SystemExit as e:
        return e.code
    return 0


def test_sample_with_checkpoint_of_another_model_is_one_line(tmp_path):
    model, tokenizer = tiny()
    from transformers import JanusForConditionalGeneration
    other = JanusForConditionalGeneration(spm.janus_config(len(tokenizer), hidden=32, heads=2))
    membranes = spm.attach_membranes(other, tokenizer, scope="image")
    spm.save_membranes(tmp_path / "m.safetensors", membranes, RUN, step=1)
    result = run_cli("sample.py", "--ckpt", str(tmp_path / "m.safetensors"), "--out", str(tmp_path / "o"))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "another model" in lines[0], result.stderr


def test_every_flag_has_help_and_no_prefix_stands_for_a_flag():
    import ablate
    import bench
    import sample
    for parser in (spm.build_parser(), sample.build_parser(), attack.build_parser(), ablate.build_parser(),
                   bench.build_parser()):
        assert parser.allow_abbrev is False, parser.prog  # --step must not be read as --steps
        for action in parser._actions:
            assert action.help, action.option_strings


def test_merge_and_unmerge():
    model, tokenizer = tiny()
    weights = {n: p.clone() for n, p in model.named_parameters()}
    membranes = spm.attach_membranes(model, tokenizer, layers="attn+mlp", scope="all")
    # Factors of 0.1 move the logits by about 0.07 and merging rounds W + delta by about 4e-8; at 0.5 the deltas
    # dwarf W and float32 rounding of W + delta reached 2e-4 on some CPUs.
    randomise(membranes, scale=0.1)
    codes = codes_for(model, tokenizer)
    unmerged = all_logits(model, tokenizer, codes)
    with membranes.disabled():
        assert (all_logits(model, tokenizer, codes) - unmerged).abs().max() > 1e-2
    membranes.merge()
    torch.testing.assert_close(all_logits(model, tokenizer, codes), unmerged, rtol=0, atol=1e-6)
    with pytest.raises(spm.SPMError, match="unmerge"):
        with membranes.disabled():
            pass
    membranes.unmerge()  # W back to float rounding (checked to 1e-6 below)
    torch.testing.assert_close(all_logits(model, tokenizer, codes), unmerged, rtol=0, atol=1e-6)
    membranes.detach()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, weights[name], rtol=0, atol=1e-6)


@pytest.mark.parametrize("scope", ["image", "prompt", "prompt+image"])
def test_merge_is_refused_for_gated_scopes(scope):
    model, tokenizer = tiny()
    membranes = spm.attach_membranes(model, tokenizer, scope=scope)
    with pytest.raises(spm.SPMError, match=re.escape(f"scope {scope}")):
        membranes.merge()


# -----------------------------------------------------------------------------
# Reliability: crash-safe checkpoints, exact resume, clear errors


def membrane_tensors(path):
    return spm.read_checkpoint(path)[0]


def checkpoint_step(path):
    try:
        return int(spm.read_checkpoint(path)[1]["step"])
    except (spm.SPMError, OSError):
        return 0


# the default levers, at a fraction of their cost: a 2-step soft-prompt attack
TRAIN = ["spm_janus.py", "--model", "tiny", "--concept", "mouse", "--batch-size", "2", "--sample-every", "0",
         "--adversarial-steps", "2"]


def test_kill_9_then_resume_equals_an_uninterrupted_run(tmp_path):
    import signal
    import time
    steps = 12
    straight = run_cli(*TRAIN, "--steps", str(steps), "--out", str(tmp_path / "straight"))
    assert straight.returncode == 0, straight.stderr
    killed = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, *TRAIN, "--steps", str(steps), "--save-every", "3",
                                "--out", str(killed)], cwd=HERE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while checkpoint_step(killed / "membranes.safetensors") < 3 and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    saved_step = checkpoint_step(killed / "membranes.safetensors")
    assert 3 <= saved_step < steps, "the run ended before it could be killed: raise steps"
    resumed = run_cli(*TRAIN, "--steps", str(steps), "--resume", str(killed))
    assert resumed.returncode == 0, resumed.stderr
    a, b = membrane_tensors(tmp_path / "straight" / "membranes.safetensors"), membrane_tensors(killed / "membranes.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6)
    assert any(v.abs().sum() > 0 for k, v in a.items() if k.endswith(".up"))


def test_sigint_saves_a_checkpoint_and_exits_non_zero(tmp_path):
    import signal
    import time
    out = tmp_path / "run"
    process = subprocess.Popen([sys.executable, *TRAIN, "--steps", "500", "--out", str(out)], cwd=HERE,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().count("\n") >= 2) \
            and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGINT
    step = checkpoint_step(out / "membranes.safetensors")
    assert step == len((out / "metrics.jsonl").read_text().splitlines()) >= 2
    assert f"at step {step}" in stderr and "--resume" in stderr


def test_truncated_and_corrupt_checkpoints_are_rejected_by_name(tmp_path):
    model, tokenizer = tiny()
    membranes = spm.attach_membranes(model, tokenizer, scope="image")
    good = tmp_path / "good.safetensors"
    spm.save_membranes(good, membranes, RUN, step=1)
    data = good.read_bytes()
    truncated, garbage, no_meta = tmp_path / "truncated.safetensors", tmp_path / "garbage.safetensors", tmp_path / "m.safetensors"
    truncated.write_bytes(data[:len(data) // 2])
    garbage.write_bytes(b"\x00" * 64)
    from safetensors.torch import save_file
    save_file(membranes.state_dict(), str(no_meta))
    for path, needle, code in [(truncated, "truncated or corrupt", 1), (garbage, "truncated or corrupt", 1),
                               (no_meta, "metadata", 2)]:  # a broken file is a failure, another kind of file input
        result = run_cli("sample.py", "--ckpt", str(path), "--out", str(tmp_path / "o"))
        lines = result.stderr.strip().splitlines()
        assert result.returncode == code and len(lines) == 1, result.stderr
        assert str(path) in lines[0] and needle in lines[0]


def test_mismatched_tensor_names_are_rejected(tmp_path):
    model, tokenizer = tiny()
    membranes = spm.attach_membranes(model, tokenizer, scope="image")
    tensors = membranes.state_dict()
    tensors["model.language_model.layers.0.self_attn.q_proj.extra"] = torch.zeros(1)
    with pytest.raises(spm.SPMError, match="unexpected"):
        membranes.load_state_dict(tensors, source="x")
    tensors = membranes.state_dict()
    key = next(iter(tensors))
    tensors[key] = torch.zeros(3, 3)
    with pytest.raises(spm.SPMError, match="shape"):
        membranes.load_state_dict(tensors, source="x")


@pytest.mark.parametrize("argv,code,needle", [
    (["--concept", ""], 2, "--concept"),
    (["--surrogate", "mouse"], 2, "--surrogate"),
    (["--anchor", "prompts"], 2, "--anchor-prompts"),
    (["--modules", "foo_proj"], 2, "foo_proj"),
    (["--attn-layer-ids", "9"], 2, "out of range"),
    (["--rank", "0"], 2, "--rank"),
    (["--steps", "-3"], 2, "--steps"),
    (["--templates", "a {} " + "very " * 1200], 2, "longer than the model's context"),
    (["--device", "cuda"], 2, "CUDA"),
    (["--model", "/nonexistent/janus"], 2, "no such directory"),
    (["--concept", "zebra"], 2, "cannot spell"),
    (["--avoid", "zebra"], 2, "'zebra' has words this model's tokenizer cannot spell"),
])
def test_bad_input_gets_one_line_and_an_exit_code(tmp_path, argv, code, needle, capsys):
    if needle == "CUDA" and torch.cuda.is_available():
        argv = ["--device", "cuda:99"]
    got = main_exit_code(spm.main, [*TRAIN[1:], "--steps", "1", "--out", str(tmp_path / "r"), *argv])
    lines = capsys.readouterr().err.strip().splitlines()
    assert got == code and len(lines) == 1 and needle in lines[0], lines
    assert not (tmp_path / "r" / "membranes.safetensors").exists()


def offline_env(tmp_path):
    """No hub (a closed local port answers at once) and an empty cache, whatever the shell says: HF_HUB_OFFLINE and
    TRANSFORMERS_OFFLINE (which huggingface_hub reads as HF_HUB_OFFLINE) unset."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME")}
    return dict(env, HF_ENDPOINT="http://127.0.0.1:9", HF_HUB_CACHE=str(tmp_path / "hub"), HF_HOME=str(tmp_path / "hf"))


def test_a_missing_model_offline_is_one_line_without_retries(tmp_path):
    result = subprocess.run([sys.executable, "spm_janus.py", "--model", "some-org/missing", "--concept", "mouse",
                             "--out", str(tmp_path / "r")], cwd=HERE, capture_output=True, text=True, timeout=120,
                            env=offline_env(tmp_path))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1 and not result.stdout, result.stderr
    assert "cannot reach the Hugging Face hub" in lines[0] and "local cache" in lines[0]
    assert "retry" not in result.stderr.lower() and "warning" not in result.stderr.lower()
    assert not (tmp_path / "r").exists()  # nothing written for a model that is not there


def test_a_cached_hub_id_loads_without_the_hub(bpe_janus_dir, tmp_path, monkeypatch):
    """A hub id in the local cache loads as before when the hub cannot be reached or HF_HUB_OFFLINE is set; one that
    is not there is a one-line error either way."""
    import shutil
    from huggingface_hub import constants
    repo, commit = tmp_path / "models--test-org--janus-bpe", "0" * 40
    shutil.copytree(bpe_janus_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    for offline in (False, True):
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
        spm.hub_kwargs.cache_clear()
        assert spm.hub_kwargs("test-org/janus-bpe") == {"local_files_only": True}
        model, tokenizer = spm.load_model("test-org/janus-bpe")
        assert tokenizer.bos_token == BPE_BOS and model.config.vision_config.num_image_tokens == 64
        with pytest.raises(spm.SPMError, match="HF_HUB_OFFLINE is set" if offline else "cannot reach"):
            spm.load_config("some-org/missing")
    spm.hub_kwargs.cache_clear()


def test_out_dir_that_cannot_be_written_or_holds_another_run(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = run_cli(*TRAIN, "--steps", "1", "--out", str(blocker / "run"))
    assert result.returncode == 2 and "cannot be written" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert run_cli(*TRAIN, "--steps", "1", "--out", str(tmp_path / "r")).returncode == 0
    result = run_cli(*TRAIN, "--steps", "1", "--out", str(tmp_path / "r"))
    assert result.returncode == 2 and "already holds a run" in result.stderr
    result = run_cli(*TRAIN, "--steps", "2", "--resume", str(tmp_path / "r"), "--loss", "mse")
    assert result.returncode == 2 and "--loss was 'kl'" in result.stderr
    assert run_cli(*TRAIN, "--steps", "2", "--resume", str(tmp_path / "r")).returncode == 0
    result = run_cli("sample.py", "--ckpt", str(tmp_path / "missing.safetensors"))
    assert result.returncode == 2 and "does not exist" in result.stderr


def test_non_finite_steps_are_skipped_then_stop(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(spm, "divergence", lambda *a, **k: torch.tensor(float("nan"), requires_grad=True))
    with pytest.raises(SystemExit) as exit_info:
        spm.main([*TRAIN[1:], "--steps", "20", "--max-bad-steps", "3", "--out", str(tmp_path / "r")])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.count("step skipped") == 3 and "3 steps in a row" in err


def test_random_flag_combinations_end_cleanly(tmp_path):
    """Every combination of flags ends in a clean run that saved its checkpoint, or in a one-line error, never in a
    traceback."""
    import io
    from hypothesis import given, settings, strategies as st

    flag_values = {
        "--layers": st.sampled_from(["attn", "mlp", "attn+mlp"]),
        "--modules": st.sampled_from(["q_proj", "v_proj,o_proj", "gate_proj", "down_proj,q_proj", "nope"]),
        "--attn-layer-ids": st.sampled_from(["0", "0-1", "1", "2", "x"]),
        "--mlp-layer-ids": st.sampled_from(["0", "1", "0-5"]),
        "--scope": st.sampled_from(["image", "prompt", "all"]),
        "--loss": st.sampled_from(["kl", "mse"]),
        "--kl-direction": st.sampled_from(["forward", "reverse"]),
        "--loss-on": st.sampled_from(["cond", "cfg"]),
        "--rollout": st.sampled_from(["student", "teacher"]),
        "--anchor": st.sampled_from(["none", "latent", "prompts"]),
        "--anchor-prompts": st.sampled_from(["cat", "car", ""]),
        "--surrogate": st.sampled_from(["", "real mouse", "mouse", "dog"]),
        "--rank": st.integers(-1, 3),
        "--steps": st.integers(0, 1),
        "--eta": st.floats(-1, 3),
        "--concept": st.sampled_from(["mouse", "cat", "", "real mouse"]),
    }
    runs, codes = iter(range(10 ** 6)), set()

    @settings(max_examples=25, deadline=None, derandomize=True, database=None)  # nothing written in the repo
    @given(st.fixed_dictionaries({}, optional=flag_values))
    def check(flags):
        out = tmp_path / str(next(runs))
        argv = ["--model", "tiny", "--batch-size", "1", "--steps", "1", "--sample-every", "0",
                "--out", str(out)]  # flags drawn below override these
        if "--concept" not in flags:
            argv += ["--concept", "mouse"]
        argv += [f"{flag}={value}" for flag, value in flags.items()]  # --eta=-1 is not read as a flag
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            try:
                spm.main(argv)
                code = 0
            except SystemExit as e:
                code = e.code
        codes.add(code)
        if code == 0:
            assert (out / spm.CHECKPOINT_NAME).is_file(), flags
            assert spm.read_checkpoint(out / spm.CHECKPOINT_NAME)[1]["step"] == str(flags.get("--steps", 1))
        else:  # the whole of stderr: an error comes before the progress bar
            lines = stderr.getvalue().splitlines()
            assert code in (1, 2) and len(lines) == 1 and lines[0].startswith("spm_janus.py: error: "), lines

    check()
    assert 0 in codes and codes - {0}, codes  # both kinds of ending were drawn


# -----------------------------------------------------------------------------
# Data parallel with torchrun (gloo on CPU)


def torchrun(*argv):
    return run_cli("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *argv)


@pytest.mark.slow
def test_torchrun_two_processes_equal_one_process_with_the_whole_batch(tmp_path):
    common = ["--model", "tiny", "--concept", "mouse", "--anchor", "latent", "--sample-every", "0"]
    single = run_cli("spm_janus.py", *common, "--batch-size", "2", "--steps", "3", "--out", str(tmp_path / "single"))
    assert single.returncode == 0, single.stderr
    parallel = torchrun("spm_janus.py", *common, "--batch-size", "1", "--steps", "3", "--out", str(tmp_path / "ddp"))
    assert parallel.returncode == 0, parallel.stderr
    interrupted = torchrun("spm_janus.py", *common, "--batch-size", "1", "--steps", "2", "--out", str(tmp_path / "resumed"))
    assert interrupted.returncode == 0, interrupted.stderr
    resumed = torchrun("spm_janus.py", *common, "--batch-size", "1", "--steps", "3", "--resume", str(tmp_path / "resumed"))
    assert resumed.returncode == 0, resumed.stderr
    # The gradients themselves, through the logged norm of the averaged gradient: AdamW's scale-free update all but
    # hides summed gradients in the membranes (3.5e-5 off), not in this norm, which they double. The norm agrees to
    # 2e-7 relative; the losses (about 3e-4) to 2e-8.
    metrics = {run: [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
               for run in ("single", "ddp", "resumed")}
    for run in ("ddp", "resumed"):
        assert [m["step"] for m in metrics[run]] == [m["step"] for m in metrics["single"]] == [1, 2, 3]
        for got, expected in zip(metrics[run], metrics["single"]):
            assert math.isclose(got["grad_norm"], expected["grad_norm"], rel_tol=1e-5), (run, got, expected)
            for key in ("loss", "erase", "anchor"):
                assert math.isclose(got[key], expected[key], abs_tol=1e-7), (run, key, got, expected)
    expected = membrane_tensors(tmp_path / "single" / "membranes.safetensors")
    assert any(v.abs().max() > 1e-4 for k, v in expected.items() if k.endswith(".up"))
    for run in ("ddp", "resumed"):
        got = membrane_tensors(tmp_path / run / "membranes.safetensors")
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-5)
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == ["membranes.safetensors", "metrics.jsonl",
                                                                     "trainer_state.pt"]
    assert len((tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()) == 3  # rank 0 alone writes
    assert spm.read_checkpoint(tmp_path / "ddp")[1]["world_size"] == "2"
    sampled = run_cli("sample.py", "--ckpt", str(tmp_path / "ddp" / "membranes.safetensors"), "--n", "1",
                      "--out", str(tmp_path / "s"))
    assert sampled.returncode == 0, sampled.stderr


# -----------------------------------------------------------------------------
# Inference: facilitated transport, several membranes, understanding, PEFT


def test_transport_strength():
    model, tokenizer = tiny()
    assert inference.transport_strength(model, tokenizer, "a red mouse", ["mouse"]) == 1.0
    unrelated = inference.transport_strength(model, tokenizer, "a blue car", ["mouse"])
    assert 0 <= unrelated < 1.0
    assert inference.transport_strength(model, tokenizer, "a blue car", ["mouse"], factor=0.5) == pytest.approx(unrelated / 2)


def test_strength_zero_gives_exactly_the_base_logits():
    model, tokenizer = tiny()
    codes = codes_for(model, tokenizer)
    base = all_logits(model, tokenizer, codes)
    membranes = spm.attach_membranes(model, tokenizer, layers="attn+mlp", scope="all")
    randomise(membranes)
    with membranes.strength(0.0):
        assert torch.equal(all_logits(model, tokenizer, codes), base)


def test_two_membranes_add_at_every_module():
    model, tokenizer = tiny()
    first = spm.attach_membranes(model, tokenizer, layers="attn", scope="all", seed=1)
    second = spm.attach_membranes(model, tokenizer, layers="attn+mlp", attn_layer_ids="1", scope="all", seed=2)
    randomise(first, 1), randomise(second, 2)
    first.state.multiplier, second.state.multiplier = 0.7, 0.3
    x = torch.randn(2, 5, model.config.text_config.hidden_size)
    for name, linear in model.named_modules():
        if not isinstance(linear, torch.nn.Linear) or "language_model.layers" not in name or ".down" in name \
                or ".up" in name:
            continue
        module_name = name.removesuffix(".base").removesuffix(".base")
        outer = model.get_submodule(module_name)
        inp = torch.randn(2, 5, linear.in_features) if linear.in_features != x.shape[-1] else x
        with torch.no_grad():
            total = outer(inp) - linear(inp)
            expected = torch.zeros_like(total)
            for membranes in (first, second):
                if module_name in membranes.modules:
                    m = membranes.modules[module_name]
                    expected += m.up(m.down(inp)) * m.scale * membranes.state.multiplier
        torch.testing.assert_close(total, expected, rtol=1e-5, atol=1e-6)
    second.detach(), first.detach()
    assert not any(isinstance(m, spm.MembraneLinear) for m in model.modules())


@pytest.mark.parametrize("scope", ["image", "prompt", "prompt+image", "all"])
def test_understanding_is_identical_under_scopes_image_and_prompt(scope):
    """Only rows that draw an image have prompt or image positions: image+question and text-only inputs run the base
    model exactly under scope image and scope prompt (the prompt scope once acted on every position of them)."""
    model, tokenizer = tiny()
    membranes = spm.attach_membranes(model, tokenizer, layers="attn+mlp", scope=scope)
    randomise(membranes)
    images = spm.decode_images(model, codes_for(model, tokenizer))
    for pictures, questions in ((images, ["is there a mouse ?", "a cat"]), (None, ["a photo of a mouse", "a cat"])):
        drift = inference.understanding_drift(model, tokenizer, membranes, questions, pictures)
        if scope == "all":
            assert drift["max_abs_logit_diff"] > 1e-3
        else:
            assert drift == {"kl": 0.0, "top1_agreement": 1.0, "max_abs_logit_diff": 0.0}


@pytest.mark.parametrize("scope", ["image", "prompt", "prompt+image"])
def test_text_generation_with_a_kv_cache_is_the_base_models(scope):
    """Answering runs KV-cached steps after the question: they are no image steps either, so every generated
    token's scores equal the base model's bit for bit, in a batch that also holds an image prompt."""
    model, tokenizer = tiny()
    membranes = spm.attach_membranes(model, tokenizer, layers="attn+mlp", scope=scope)
    randomise(membranes)
    images = spm.decode_images(model, codes_for(model, tokenizer))[:1]
    input_ids, mask = inference.understanding_inputs(tokenizer, model, ["is there a mouse ?"],
                                                     inference.pixels_for_understanding(model, images))

    def answer():
        out = model.generate(input_ids=input_ids, attention_mask=mask, pixel_values=inference.pixels_for_understanding(
            model, images), max_new_tokens=4, do_sample=False, output_scores=True, return_dict_in_generate=True,
            generation_mode="text")
        return out.sequences, torch.stack(out.scores)

    with membranes.disabled():
        base_tokens, base_scores = answer()
    tokens, scores = answer()
    assert torch.equal(tokens, base_tokens) and torch.equal(scores, base_scores)
    # while a batch that draws an image still gets the membranes (the gate is per row)
    _, cond, uncond, mask = prompt_batch(model, tokenizer)
    uniforms = spm.rollout_uniforms(0, 0, 0, len(PROMPTS), model.config.vision_config.num_image_tokens)
    erased = spm.sample_codes(model, cond, uncond, mask, 5.0, 1.0, uniforms)
    with membranes.disabled():
        assert not torch.equal(spm.sample_codes(model, cond, uncond, mask, 5.0, 1.0, uniforms), erased)


def test_peft_export_gives_the_same_logits(tmp_path):
    peft = pytest.importorskip("peft")
    model, tokenizer = tiny()
    membranes = spm.attach_membranes(model, tokenizer, layers="attn+mlp", scope="all", alpha=2.0)
    randomise(membranes)
    spm.save_membranes(tmp_path / "m.safetensors", membranes, spm.Config(model="tiny", concept="mouse", scope="all"), step=1)
    codes = codes_for(model, tokenizer)
    expected = all_logits(model, tokenizer, codes)
    result = run_cli("spm_janus.py", "export-peft", "--ckpt", str(tmp_path / "m.safetensors"), "--out", str(tmp_path / "peft"))
    assert result.returncode == 0, result.stderr
    base, _ = tiny()
    peft_model = peft.PeftModel.from_pretrained(base, str(tmp_path / "peft")).eval()
    torch.testing.assert_close(all_logits(peft_model.base_model.model, tokenizer, codes), expected, rtol=0, atol=1e-5)


def test_peft_export_refuses_gated_scopes(tmp_path):
    model, tokenizer = tiny()
    membranes = spm.attach_membranes(model, tokenizer, scope="image")
    spm.save_membranes(tmp_path / "m.safetensors", membranes, RUN, step=1)
    with pytest.raises(spm.SPMError, match="scope image"):
        inference.export_peft(tmp_path / "m.safetensors", tmp_path / "peft")


def test_sample_with_two_checkpoints_and_transport(tmp_path):
    model, tokenizer = tiny()
    paths = []
    for concept, seed in (("mouse", 1), ("cat", 2)):
        membranes = spm.attach_membranes(model, tokenizer, scope="image", seed=seed)
        randomise(membranes, seed)
        paths += ["--ckpt", str(tmp_path / f"{concept}.safetensors")]
        spm.save_membranes(tmp_path / f"{concept}.safetensors", membranes, spm.Config(model="tiny", concept=concept), step=1)
        membranes.detach()
    result = run_cli("sample.py", *paths, "--transport", "--prompt", "a red mouse", "--prompt", "a blue car",
                     "--n", "1", "--understanding", "--out", str(tmp_path / "o"))
    assert result.returncode == 0, result.stderr
    strengths = [line for line in result.stdout.splitlines() if "strength" in line]
    assert strengths[0].startswith("'a red mouse': strength mouse 1.000")
    mouse_strength = float(strengths[1].split("mouse ")[1].split(",")[0])
    assert mouse_strength < 1.0
    understanding = [line for line in result.stdout.splitlines() if line.startswith("understanding, ")]
    kinds = ("image+question", "text only")
    assert sorted(line.split(" (scope")[0] for line in understanding) == \
        [f"understanding, {kind}, {concept}" for kind in kinds for concept in ("cat", "mouse")]
    for line in understanding:  # every membrane set on every input kind, not just one of the four
        assert line.endswith(" (scope image): KL 0, top-1 agreement 1.000, max |logit diff| 0"), line


def tiny_clip(tokenizer):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTextConfig, CLIPVisionConfig
    eos = tokenizer.eos_token_id
    config = CLIPConfig(
        text_config=CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, max_position_embeddings=32, bos_token_id=1,
                                   eos_token_id=eos, pad_token_id=0).to_dict(),
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=2, image_size=32, patch_size=8).to_dict(),
        projection_dim=16)
    torch.manual_seed(0)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return CLIPModel(config).eval(), processor


def test_clip_judge_picks_the_nearest_label():
    model, tokenizer = tiny()
    clip, processor = tiny_clip(tokenizer)
    labels = ["mouse", "cat", "dog"]
    decode = lambda codes: spm.decode_images(model, codes)
    judge = evaluation.clip_judge(clip, tokenizer, processor, decode, labels, neutral=("a car",))
    codes = spm.sample_prompts(model, tokenizer, ["a mouse"], [0, 1, 2, 3, 4, 5], 5.0, 1.0)[0]
    got = judge(codes, ["a mouse"] * len(codes))
    texts = [f"a photo of a {l}" for l in labels] + ["a car"]
    tokens = tokenizer(texts, padding=True, return_tensors="pt")
    pixels = processor(images=[i.numpy() for i in decode(codes)], return_tensors="pt").pixel_values
    with torch.no_grad():
        scores = clip(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, pixel_values=pixels).logits_per_image
    expected = [(labels + ["none"])[i] for i in scores.argmax(-1).tolist()]
    assert got == expected and len(got) == 6


def test_janus_judge_reads_the_base_model_with_membranes_off():
    model, tokenizer = tiny()
    codes = spm.sample_prompts(model, tokenizer, ["a mouse", "a cat"], [0, 1, 2], 5.0, 1.0).flatten(0, 1)
    decode = lambda c: spm.decode_images(model, c)
    labels = ["mouse", "cat", "car"]
    plain = evaluation.janus_judge(model, tokenizer, [], labels, decode)(codes, [""] * len(codes))
    membranes = spm.attach_membranes(model, tokenizer, layers="attn+mlp", scope="all")
    randomise(membranes)
    judged = evaluation.janus_judge(model, tokenizer, [(membranes, {})], labels, decode)(codes, [""] * len(codes))
    assert judged == plain and set(judged) <= set(labels + ["none"]) and len(judged) == 6
    assert membranes.state.enabled  # switched back on after judging


# -----------------------------------------------------------------------------
# A checkpoint shaped like Janus-Pro's: byte-level BPE with DeepSeek's special tokens, saved and loaded by path


BPE_BOS, BPE_EOS, BPE_PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"
BPE_SPECIALS = [BPE_BOS, BPE_EOS, BPE_PAD, "<|User|>", "<|Assistant|>", "<begin_of_image>", "<end_of_image>",
                "<image_placeholder>"]


def bpe_tokenizer():
    """A byte-level BPE trained here on a few strings, shaped like Janus-Pro's: DeepSeek's special tokens after the
    learnt vocabulary (ids 100000 and up there), BOS in front of every text, no <unk>. It pads on the RIGHT, as a
    converted tokenizer may: every test on it checks the left padding as well."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    words = list(spm.COMMON_CONCEPTS) + ["Mickey Mouse", "real", "red", "blue"]
    texts = [t.format(w) for t in spm.DEFAULT_TEMPLATES for w in words] + \
        [f"Is there a {w} in this image ? Answer yes or no ." for w in words] + ["Yes", "No", "(Mickey Mouse)"]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(texts * 4, trainers.BpeTrainer(vocab_size=400, show_progress=False,
                                                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    backend.add_special_tokens(BPE_SPECIALS)
    backend.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{BPE_BOS} $A", special_tokens=[(BPE_BOS, backend.token_to_id(BPE_BOS))])])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=BPE_BOS, eos_token=BPE_EOS, pad_token=BPE_PAD, padding_side="right",
        extra_special_tokens={"image_token": "<image_placeholder>", "boi_token": "<begin_of_image>",
                              "eoi_token": "<end_of_image>"})


@pytest.fixture(scope="module")
def bpe_janus_dir(tmp_path_factory):
    """A directory in transformers' format, as a downloaded checkpoint: a tiny random Janus and the BPE tokenizer.
    Load it by path: spm.load_model(str(bpe_janus_dir))."""
    from transformers import JanusForConditionalGeneration
    tokenizer = bpe_tokenizer()
    config = spm.janus_config(len(tokenizer), image_token_id=tokenizer.convert_tokens_to_ids(tokenizer.image_token))
    text = config.text_config
    text.bos_token_id, text.eos_token_id, text.pad_token_id = (tokenizer.bos_token_id, tokenizer.eos_token_id,
                                                               tokenizer.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = JanusForConditionalGeneration(config)
    path = tmp_path_factory.mktemp("janus-bpe")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_bpe_checkpoint_loads_by_path_and_pads_left(bpe_janus_dir):
    model, tokenizer = spm.load_model(str(bpe_janus_dir))
    assert tokenizer.padding_side == "right" and tokenizer.unk_token_id is None
    assert (tokenizer.bos_token, tokenizer.pad_token, tokenizer.boi_token, tokenizer.eoi_token, tokenizer.image_token) \
        == (BPE_BOS, BPE_PAD, "<begin_of_image>", "<end_of_image>", "<image_placeholder>")
    ids = spm.special_ids(tokenizer)
    assert model.generation_config.generation_kwargs == {"boi_token_id": ids["boi"]}
    input_ids, mask = spm.encode_prompts(tokenizer, ["Mickey Mouse", "a photo of a cat"])
    first = int(mask[0].argmax())
    assert first > 0 and (input_ids[0, :first] == ids["pad"]).all() and (input_ids[:, -1] == ids["boi"]).all()
    assert tokenizer.convert_ids_to_tokens(input_ids[0, first:].tolist()) == \
        [BPE_BOS, "<|User|>", ":", "ĠMickey", "ĠMouse", "Ċ", "Ċ", "<|Assistant|>", ":", "<begin_of_image>"]
    uncond = spm.unconditional_ids(input_ids, tokenizer)
    assert (uncond[0, first] == ids["bos"]) and (uncond[0, first + 1:-1] == ids["pad"]).all()


def test_bpe_concept_positions_are_the_prompts_own_tokens(bpe_janus_dir, monkeypatch):
    """Latent anchoring replaces the concept's token embeddings: byte-level BPE spells 'Mickey' as 'ĠMickey' after a
    space but 'Mickey' after '(', so the concept must be found in the prompt as tokenized, not by its own ids."""
    model, tokenizer = spm.load_model(str(bpe_janus_dir))
    prompts = ["a photo of Mickey Mouse", "(Mickey Mouse)", "mickey mouse", "a picture of a cat"]
    input_ids, _ = spm.encode_prompts(tokenizer, prompts)
    columns = spm.concept_token_positions(tokenizer, prompts, ["Mickey Mouse"] * 4, input_ids)
    assert [tokenizer.decode(input_ids[i, c]).strip() for i, c in enumerate(columns[:3])] == \
        ["Mickey Mouse", "Mickey Mouse", "mickey mouse"]
    assert tokenizer.convert_ids_to_tokens(input_ids[1, columns[1]].tolist()) == ["Mickey", "ĠMouse"]
    assert columns[3] == []
    seen = []
    anchor_embeds = spm.latent_anchor_embeds
    monkeypatch.setattr(spm, "latent_anchor_embeds", lambda embeds, cols, g: seen.append(cols[0]) or
                        anchor_embeds(embeds, cols, g))
    membranes = spm.attach_membranes(model, tokenizer, scope="prompt")
    config = train_config(model, tokenizer, concept=["Mickey Mouse"], templates=["a photo of {}", "({})"],
                          anchor="latent", batch_size=2)
    spm.Trainer(model, tokenizer, membranes, config).step()
    assert len(seen) == 2 and all(len(cols) == 2 for cols in seen)  # both tokens of the concept, in every row


def test_bpe_transport_finds_the_concept_in_any_spelling(bpe_janus_dir):
    model, tokenizer = spm.load_model(str(bpe_janus_dir))
    for prompt in ("a photo of Mickey Mouse", "(Mickey Mouse) on a boat", "mickey mouse"):
        assert inference.prompt_concept_match(model, tokenizer, prompt, "Mickey Mouse") == 1.0, prompt
    assert inference.prompt_concept_match(model, tokenizer, "a red Mouse", "Mickey Mouse") >= 0.5  # one of two tokens
    assert inference.transport_strength(model, tokenizer, "a photo of a cat", ["Mickey Mouse"]) < 1.0


def test_bpe_janus_judge_reads_whole_answer_tokens(bpe_janus_dir):
    model, tokenizer = spm.load_model(str(bpe_janus_dir))
    answers = {w: set(tokenizer.convert_ids_to_tokens(evaluation.answer_token_ids(tokenizer, w))) for w in ("yes", "no")}
    assert answers == {"yes": {"yes", "Ġyes", "Yes"}, "no": {"no", "Ġno", "No"}}  # ' Yes' is 'Ġ' 'Yes': left out
    codes = spm.sample_prompts(model, tokenizer, ["Mickey Mouse", "a cat"], [0], 5.0, 1.0).flatten(0, 1)
    judged = evaluation.janus_judge(model, tokenizer, [], ["Mickey Mouse", "cat"],
                                lambda c: spm.decode_images(model, c))(codes, [""] * 2)
    assert len(judged) == 2 and set(judged) <= {"Mickey Mouse", "cat", "none"}


def test_bpe_train_a_two_token_concept_then_sample_compare(bpe_janus_dir, tmp_path, capsys):
    import sample
    from PIL import Image
    out = tmp_path / "run"
    spm.main(["--model", str(bpe_janus_dir), "--concept", "Mickey Mouse", "--steps", "2", "--batch-size", "2",
              "--sample-every", "0", "--out", str(out)])
    tensors, metadata = spm.read_checkpoint(out / "membranes.safetensors")
    assert metadata["config"]["concept"] == ["Mickey Mouse"] and metadata["step"] == "2"
    assert "cat" in metadata["config"]["anchor_prompts"]  # the built-in list: BPE spells every word
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and all(m["finite"] for m in metrics)
    capsys.readouterr()
    sample.main(["--ckpt", str(out / "membranes.safetensors"), "--prompt", "a photo of Mickey Mouse", "--prompt",
                 "a cat", "--compare", "--transport", "--n", "2", "--out", str(tmp_path / "cmp")])
    printed = capsys.readouterr().out
    assert "'a photo of Mickey Mouse': strength Mickey Mouse 1.000" in printed
    image = Image.open(tmp_path / "cmp" / "compare.png")
    assert image.width > image.height  # two prompt rows, 2 base and 2 erased columns


def test_bench_quick_runs_on_a_checkpoint_directory(bpe_janus_dir, tmp_path):
    """bench.py --model: the same report on a checkpoint's own weights, tokenizer and image tokens."""
    import bench
    bench.main(["--quick", "--model", str(bpe_janus_dir), "--pairs", "1", "--warmup-runs", "0", "--sections", "train,sample",
                "--json", str(tmp_path / "b.json")])
    report = json.loads((tmp_path / "b.json").read_text())
    assert report["n_image_tokens"] == 64 and report["model"].startswith(str(bpe_janus_dir))
    assert report["dtype"] == "float32" and report["targets"] == {}
    assert report["loss_max_abs_diff"] < 1e-5 and report["merged_tokens_identical"] is True


# -----------------------------------------------------------------------------
# bfloat16


def test_bfloat16_trains_and_samples_with_float32_membranes(tmp_path):
    """--dtype bfloat16 end to end on CPU. The one-pass loss equals the stepwise one to 1% (rtol 1e-2): bfloat16
    keeps 8 significant bits (a relative rounding of up to 2^-9, 0.2%, at every op), and the two ways round at
    different places; measured about 1e-4 here, against 2e-6 in float32."""
    import bench
    import sample
    out = tmp_path / "run"
    spm.main([*TRAIN[1:], "--dtype", "bfloat16", "--steps", "2", "--out", str(out)])
    tensors, metadata = spm.read_checkpoint(out / "membranes.safetensors")
    assert metadata["config"]["dtype"] == "bfloat16" and {t.dtype for t in tensors.values()} == {torch.float32}
    sample.main(["--ckpt", str(out), "--n", "1", "--compare", "--out", str(tmp_path / "c")])
    assert (tmp_path / "c" / "compare.png").stat().st_size > 0

    model, tokenizer = spm.load_model("tiny", "bfloat16")
    membranes, _ = spm.load_membranes(out / "membranes.safetensors", model, tokenizer)
    randomise(membranes)  # a clear delta: two warm-up steps barely move the factors
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16
    assert {p.dtype for p in membranes.parameters()} == {torch.float32}
    _, cond, uncond, mask = prompt_batch(model, tokenizer)
    codes = spm.sample_codes(model, cond, uncond, mask, 5.0, 1.0, spm.rollout_uniforms(0, 0, 0, 2, 64))
    with torch.no_grad(), membranes.disabled():
        concept, surrogate = spm.batched_image_logits(model, [(cond, mask, codes), (uncond, mask, codes)])
    target = surrogate - (concept - surrogate)
    one_pass = spm.divergence(spm.image_logits(model, cond, mask, codes), target)
    stepwise = spm.divergence(bench.stepwise_logits(model, cond, mask, codes), target)
    assert one_pass > 0
    torch.testing.assert_close(one_pass, stepwise, rtol=1e-2, atol=0)
    one_pass.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in membranes.parameters())


# -----------------------------------------------------------------------------
# The toy world: a small Janus trained here, so that erasure is measured


def toy_model():
    model, tokenizer = spm.load_model("toy")
    return model, tokenizer


def test_vocabulary_anchors_leave_out_exactly_the_concepts_synonyms_among_the_toys_object_words():
    """On the toy, the likelihood filter of --anchor-vocabulary finds the words that draw the concept without being
    told them: the mouse's synonyms rodent and vole are left out, every other object's word and synonym is kept."""
    import toy_janus as toy
    model, tokenizer = toy_model()
    object_words = {w for o in toy.OBJECTS for w in toy.words_for(o)}
    for concept in ("mouse", "dog"):
        config = spm.Config(model="toy", concept=concept, anchor="prompts", anchor_prompts=["car"],
                            anchor_vocabulary=1000).resolved(model, tokenizer)
        membranes = spm.attach_for(model, tokenizer, config)
        try:
            words, left_out = spm.vocabulary_anchors(spm.Trainer(model, tokenizer, membranes, config), 1000)
        finally:
            membranes.detach()
        assert set(left_out) & object_words == set(toy.SYNONYMS[concept])
        assert object_words - {concept, "car"} - set(toy.SYNONYMS[concept]) <= set(words)


def test_toy_judge_is_exact_on_renders():
    import toy_janus as toy
    codes, expected = [], []
    for obj in toy.OBJECTS:
        for color in toy.COLORS:
            for style in toy.STYLES:
                for shift in toy.SHIFTS:
                    codes.append(toy.render(obj, color, shift, style))
                    expected.append((obj, color, style))
    assert toy.judge_batch(torch.stack(codes)) == expected
    assert len(set(map(tuple, torch.stack(codes).tolist()))) == len(codes)  # every render is its own picture
    assert torch.equal(toy.render("cat", "blue", (1, 0)), toy.render("cat", "blue", (1, 0), "solid"))  # v2's codes
    empty = torch.zeros(toy.GRID * toy.GRID, dtype=torch.long)
    assert toy.judge(empty) == ("blank", "none", "none")
    specks = empty.clone()
    specks[[0, 9, 18, 27]] = 1  # four stray cells of ink are still an empty canvas
    assert toy.judge(specks)[0] == "blank"
    specks[36] = 1  # five are not, and they are no pictogram
    assert toy.judge(specks)[0] == "none"
    mouse = toy.render("mouse", "red")
    ink = (mouse != toy.BACKGROUND).nonzero().flatten()
    nearly = mouse.clone()
    nearly[ink[:toy.MAX_MISMATCH]] = toy.BACKGROUND  # within MAX_MISMATCH cells: still a mouse
    assert toy.judge(nearly) == ("mouse", "red", "solid")
    mixed = toy.render("mouse", "red", style="pastel")
    ink = (mixed != toy.BACKGROUND).nonzero().flatten()
    share = math.ceil(len(ink) * (1 - toy.COLOR_SHARE))  # the most cells of another style that keep the style
    mixed[ink[:share]] = toy.code_of("red", "shaded")
    assert toy.judge(mixed) == ("mouse", "red", "pastel")
    mixed[ink[share]] = toy.code_of("red", "shaded")
    assert toy.judge(mixed) == ("mouse", "red", "none")
    broken = mouse.clone()
    broken[ink[:toy.MAX_MISMATCH + 1]] = toy.BACKGROUND
    assert toy.judge(broken)[0] == "none"
    both = torch.maximum(toy.render("mouse", "red"), toy.render("cat", "red", (1, 1)))
    assert toy.judge(both)[0] == "none"


def test_toy_synonyms_are_distinct_words_of_the_tokenizer():
    import toy_janus as toy
    words = [w for o in toy.OBJECTS for w in toy.words_for(o)] + [w for c in toy.COLORS for w in toy.color_words(c)] \
        + [w for s in toy.STYLES for w in toy.style_words(s)]
    assert len(words) == len(set(words)) == 3 * (len(toy.OBJECTS) + len(toy.COLORS) + len(toy.STYLES))
    assert all(toy.object_of(w) == o for o in toy.OBJECTS for w in toy.words_for(o))
    assert [toy.meaning(w) for w in ("vole", "crimson", "dusky", "photo")] == \
        [("object", "mouse"), ("color", "red"), ("style", "shaded"), None]
    _, tokenizer = toy_model()
    assert spm.known_concepts(tokenizer, words) == words


def test_toy_base_quality():
    """Every object through its word and each synonym (a fast version of `toy_janus.py --check`)."""
    import toy_janus as toy
    model, tokenizer = toy_model()
    results = toy.base_quality(model, tokenizer, n=18, seed=1000)
    assert set(results) == set(toy.vocabulary()) & ({w for o in toy.OBJECTS for w in toy.words_for(o)} |
                                                    {w for c in toy.COLORS for w in toy.color_words(c)} |
                                                    {w for s in toy.STYLES for w in toy.style_words(s)})
    for word, r in results.items():
        assert r["n"] >= 18 and min(r["object_acc"], r["color_acc"], r["style_acc"]) >= 0.85, (word, r)


def test_evaluate_counts_each_side_and_summarizes(tmp_path):
    """evaluate() with a stub draw and judge: base and erased counts come from their own codes, and every summary
    figure equals its hand-computed value."""
    P = evaluation.EvalPrompt
    prompts = [P("a mouse", "mouse", "mouse", "a {}"), P("a red mouse", "mouse", "mouse", "a red {}"),
               P("a rodent", "mouse", "rodent", "a {}"), P("a cat", "cat", "cat", "a {}"),
               P("a dog", "dog", "dog", "a {}")]
    # a code names a label; each prompt's 4 samples, base and erased
    labels = ["mouse", "cat", "dog", "blank", "none"]
    base = {"a mouse": "0000", "a red mouse": "0000", "a rodent": "0004", "a cat": "1111", "a dog": "2222"}
    erased = {"a mouse": "3444", "a red mouse": "0134", "a rodent": "0044", "a cat": "1114", "a dog": "2244"}

    def draw(enabled, texts):
        table = erased if enabled else base
        return torch.tensor([[int(c) for c in table[t]] for t in texts])[..., None]

    judge = lambda codes, _: [labels[int(c)] for c in codes[:, 0]]
    records, summary = evaluation.evaluate(draw, prompts, judge, 4, concepts=["mouse"], anchors=["cat"],
                                       objects=("mouse", "cat", "dog"), run_templates={"a {}"},
                                       synonyms={"rodent": "mouse"}, json_path=tmp_path / "e.json")
    assert records[1]["base"] == {"mouse": 4} and records[1]["erased"] == {"mouse": 1, "cat": 1, "blank": 1, "none": 1}
    assert records[2]["base"] == {"mouse": 3, "none": 1} and records[2]["erased"] == {"mouse": 2, "none": 2}
    m = summary["mouse"]
    assert (m["trained_rate"], m["held_out_rate"], m["synonyms_rate"]) == (0.0, 0.25, 0.5)
    assert (m["base_trained_rate"], m["base_held_out_rate"], m["base_synonyms_rate"]) == (1.0, 1.0, 0.75)
    assert m["coherence"] == 3 / 12  # the blank, the cat and the blank of "a mouse"/"a red mouse"; none are not
    assert m["anchored"]["objects"] == ["cat"] and m["anchored"]["erased"] == 0.75 and m["anchored"]["retention"] == 0.75
    assert m["non_anchored"]["objects"] == ["dog"] and m["non_anchored"]["retention"] == 0.5
    assert m["H"] == pytest.approx(4 / (1 / 0.75 + 1 / 0.5 + 1 / 0.5 + 1 / 0.25))
    saved = json.loads((tmp_path / "e.json").read_text())
    assert saved["summary"]["mouse"]["H"] == m["H"] and saved["prompts"][0]["erased"] == {"blank": 1, "none": 3}


def toy_summary(model, tokenizer, membranes, config, n=8):
    """sample.py --eval's summary of mouse for these membranes, on every toy prompt with n seeds."""
    import evaluation
    import toy_janus as toy
    cfg, temperature = spm.generation_defaults(model)
    seeds = list(range(1000, 1000 + n))
    def draw(enabled, texts):
        with membranes.switched(enabled):
            return torch.stack([spm.sample_prompts(model, tokenizer, [t], seeds, cfg, temperature)[0] for t in texts])

    judge = lambda codes, _: [verdict[0] for verdict in toy.judge_batch(codes)]
    records = evaluation.judge_records(draw, evaluation.eval_prompts(), judge, n)
    return evaluation.summarize(records, config.concept, config.anchor_prompts, toy.OBJECTS, set(config.templates),
                            {w: o for o in toy.OBJECTS for w in toy.SYNONYMS[o]})["mouse"]


@pytest.mark.slow
def test_toy_erasure_with_default_settings():
    """The default run, with the benchmark's anchors (cat, car, tree), erases mouse on held-out templates and
    synonyms, leaves clean pictures in its place, and keeps most of the objects nobody anchored. Slow (about 2-3
    minutes): it is the default run itself, 400 adversarial steps."""
    import ablate
    model, tokenizer = toy_model()
    config = spm.Config(model="toy", concept="mouse", **ablate.ANCHORED).resolved(model, tokenizer)
    membranes = spm.attach_for(model, tokenizer, config)
    trainer = spm.Trainer(model, tokenizer, membranes, config)
    for _ in range(config.steps):
        trainer.step()
    after = toy_summary(model, tokenizer, membranes, config)
    # measured with this seed on toy world v3 (8 samples per prompt). Deterministic on one machine, but not across
    # CPUs: torch's kernels for another vector instruction set (ATEN_CPU_CAPABILITY) round differently, ~1e-7 after
    # 10 steps, and 400 steps of sampling amplify that into another run, like another training seed. Seed 0 gave
    # trained / held-out / synonyms, anchored, non-anchored: 7.5 / 3.1 / 0.0%, 88.7%, 80.0% under avx512; 0 / 0 / 0%,
    # 95.1%, 77.8% under avx2; 0 / 12.5 / 6.9%, 93.2%, 76.7% under default; 5.0 / 6.2 / 5.6%, 95.5%, 76.2% on an
    # earlier machine. The bounds hold all four with room and still fail an erasure that broke (anchored and
    # non-anchored fall towards 0) or stopped erasing (the rates rise towards 100%). Their spread, and the dog and the
    # coherence, are the README's missed targets, not tolerances of this test
    assert after["base_held_out_rate"] >= 0.9 and after["base_synonyms_rate"] >= 0.9, after
    assert after["trained_rate"] <= 0.15 and after["held_out_rate"] <= 0.2, after
    assert after["synonyms_rate"] <= 0.15 and after["coherence"] > 0, after
    assert after["non_anchored"]["erased"] >= 0.65 and after["anchored"]["erased"] >= 0.8, after


@pytest.mark.slow
@pytest.mark.parametrize("concept,concept_type", [("pastel", "style"), ("red", "attribute")])
def test_toy_style_and_attribute_erasure_with_default_settings(concept, concept_type):
    """The default run of a style and of a colour (its concept type's presets): the word erased where it was
    trained, the object kept, the other styles or colours and the other objects kept. Slow: two default runs."""
    model, tokenizer = toy_model()
    config = spm.Config(model="toy", concept=concept, concept_type=concept_type).resolved(model, tokenizer)
    membranes = spm.attach_for(model, tokenizer, config)
    trainer = spm.Trainer(model, tokenizer, membranes, config)
    for _ in range(config.steps):
        trainer.step()
    judge, _, synonyms = evaluation.toy_judge("toy", concept_type)
    cfg, temperature = spm.generation_defaults(model)
    seeds = list(range(1000, 1008))

    def draw(enabled, texts):
        with membranes.switched(enabled):
            return torch.stack([spm.sample_prompts(model, tokenizer, [t], seeds, cfg, temperature)[0] for t in texts])

    records = evaluation.judge_records(draw, evaluation.eval_prompts(concept_type), judge, len(seeds))
    f = evaluation.summarize(records, [concept], [], (), set(config.templates), synonyms, concept_type)[concept]
    assert f["base_trained_rate"] >= 0.9 and f["trained_rate"] <= THRESHOLDS[concept_type]["trained"], f
    assert f["held_out_rate"] <= THRESHOLDS[concept_type]["held_out"], f
    assert f["synonyms_rate"] <= THRESHOLDS[concept_type]["synonyms"], f
    assert f["object_kept"]["erased"] >= 0.9 and f["other_objects"]["erased"] >= 0.9, f
    assert f["other_values"]["erased"] >= THRESHOLDS[concept_type]["other_values"], f


# measured (ablate.py --types, 3 seeds x 16 samples) and set with room for other seeds; the colour's held-out and
# synonym rates are far from the issue's targets (5% / 10%): see the README
THRESHOLDS = {"style": {"trained": 0.05, "held_out": 0.05, "synonyms": 0.1, "other_values": 0.9},
              "attribute": {"trained": 0.3, "held_out": 0.5, "synonyms": 0.5, "other_values": 0.9}}


def test_rollout_every_reuses_the_rollout():
    model, tokenizer = tiny()
    membranes = spm.attach_membranes(model, tokenizer, scope="image")
    trainer = spm.Trainer(model, tokenizer, membranes, train_config(model, tokenizer, batch_size=2, rollout_every=3, anchor="none"))
    seen = []
    for _ in range(4):
        trainer.step()
        seen.append(trainer.cached_rollout)
    assert seen[0] is seen[1] is seen[2] and seen[3] is not seen[2] and seen[3][0] == 3


def test_bench_quick_runs(tmp_path):
    """What the benchmark promises, not how fast it is (no timing asserts): the one-pass loss, logits and gradients
    equal the stepwise ones, merged membranes draw the very tokens of unmerged ones, and CFG as two passes per step
    the tokens of one doubled batch."""
    result = run_cli("bench.py", "--quick", "--pairs", "1", "--image-tokens", "16", "--sections", "train,sample",
                     "--json", str(tmp_path / "b.json"))
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "b.json").read_text())
    assert report["n_image_tokens"] == 16 and report["device"] == "cpu"
    assert 1e-4 < report["loss"] < 10  # a real loss: two zeros would agree for nothing
    assert report["loss_max_abs_diff"] <= 1e-5
    assert report["logits_max_abs_diff"] <= 1e-5 and report["grad_max_abs_diff_over_max_grad"] <= 1e-5
    assert report["merged_tokens_identical"] is True and report["merged_tokens_differing"] == 0
    assert report["cfg_two_passes_tokens_identical"] is True
    assert report["targets"]["loss_max_abs_diff"]["met"] and report["targets"]["merged_tokens_identical"]["met"]


# -----------------------------------------------------------------------------
# Robust erasure: augmentation, target rollouts, adversarial soft prompts; attack.py


@pytest.mark.parametrize("seed", range(40))
def test_augment_template_keeps_one_slot_and_repeats(seed):
    words = ["red", "photo", "of", ","]
    edited = spm.augment_template("a photo of a {}", words, torch.Generator().manual_seed(seed))
    again = spm.augment_template("a photo of a {}", words, torch.Generator().manual_seed(seed))
    assert edited == again and edited.count("{}") == 1 and edited.count("{") == 1
    assert set(edited.split()) <= {"a", "photo", "of", "{}", "red", ",", ".", "!", "?", ":"}


def test_augment_edits_training_prompts_and_zero_keeps_the_templates():
    model, tokenizer = tiny()
    membranes = spm.attach_membranes(model, tokenizer)
    plain = spm.Trainer(model, tokenizer, membranes, train_config(model, tokenizer, augment=0.0)).pick(["mouse"], "concept")
    assert all(t in spm.DEFAULT_TEMPLATES for _, t in plain)
    edited = spm.Trainer(model, tokenizer, membranes, train_config(model, tokenizer, augment=1.0)).pick(["mouse"], "concept")
    assert all(t not in spm.DEFAULT_TEMPLATES or t == "{}" for _, t in edited) and edited != plain


def test_rollout_target_samples_the_negatively_guided_teacher():
    """--rollout target draws the concept rows from the teacher at CFG -cfg * eta: the target's own distribution."""
    model, tokenizer = tiny()
    membranes = spm.attach_membranes(model, tokenizer, scope="prompt")
    randomise(membranes)
    args = train_config(model, tokenizer, rollout="target", eta=0.5, anchor="none", batch_size=2, steps=1)
    trainer = spm.Trainer(model, tokenizer, membranes, args)
    picks = trainer.pick(args.concept, "concept")
    trainer.step()
    input_ids, mask = spm.encode_prompts(tokenizer, [t.format(c) for c, t in picks])
    embed = model.get_input_embeddings()
    uniforms = spm.rollout_uniforms(args.seed, 0, 0, 2, model.config.vision_config.num_image_tokens)
    with membranes.disabled():
        expected = spm.sample_codes(model, embed(input_ids), embed(spm.unconditional_ids(input_ids, tokenizer)), mask,
                                    -args.cfg * args.eta, args.temperature, uniforms)
    assert torch.equal(trainer.cached_rollout[1]["concept"], expected)


def soft_likelihood(model, tokenizer, soft, codes):
    cond, uncond, mask = spm.soft_prompt_inputs(model, tokenizer, soft)
    r = codes.shape[0]
    with torch.no_grad():
        return spm.cfg_log_likelihood(model, cond.expand(r, -1, -1), uncond.expand(r, -1, -1), mask.expand(r, -1),
                                      codes, 5.0, 1.0).mean().item()


def test_soft_prompt_attack_raises_the_likelihood_and_leaves_the_model_alone():
    model, tokenizer = tiny()
    membranes = spm.attach_membranes(model, tokenizer, scope="prompt")
    randomise(membranes)
    codes = codes_for(model, tokenizer)
    init = model.get_input_embeddings().weight[:4].clone()
    before = soft_likelihood(model, tokenizer, init, codes)
    weights = [p.clone() for p in membranes.parameters()]
    soft, final = spm.optimise_soft_prompt(model, tokenizer, codes, tokens=4, steps=15, lr=0.05, cfg=5.0,
                                           temperature=1.0, init=init)
    assert final > before + 0.01 and final == pytest.approx(soft_likelihood(model, tokenizer, soft, codes), abs=1e-5)
    assert all(torch.equal(a, b) and b.grad is None for a, b in zip(weights, membranes.parameters()))
    # the soft prompt sits where the text does: the prompt scope's gate covers it, the image scope's does not
    cond, _, mask = spm.soft_prompt_inputs(model, tokenizer, soft)
    model.model.language_model(inputs_embeds=cond, attention_mask=mask)
    assert membranes.state.gate[0, :, 0].tolist() == [1.0] * (cond.shape[1] - 1) + [0.0]


def test_adversarial_soft_training_attacks_every_k_steps_and_resumes(tmp_path):
    model, tokenizer = tiny()
    membranes = spm.attach_membranes(model, tokenizer, scope="prompt")
    args = train_config(model, tokenizer, adversarial="soft", adversarial_every=2, adversarial_steps=2, anchor="none", batch_size=1)
    trainer = spm.Trainer(model, tokenizer, membranes, args)
    seen = []
    for _ in range(3):
        trainer.step()
        seen.append(trainer.levers[0].pool["mouse"][0].clone())
    assert torch.equal(seen[0], seen[1]) and not torch.equal(seen[1], seen[2])  # attacked at steps 0 and 2
    state = trainer.state_dict()
    resumed = spm.Trainer(model, tokenizer, membranes, args)
    resumed.load_state_dict(state)
    assert torch.equal(resumed.levers[0].pool["mouse"][0], seen[2])


def test_adversary_pool_refreshes_one_prompt_in_turn_and_trains_on_all(tmp_path):
    model, tokenizer = tiny()
    membranes = spm.attach_membranes(model, tokenizer, scope="prompt")
    args = train_config(model, tokenizer, adversarial="soft", adversarial_every=1, adversarial_steps=2, anchor="none",
                        batch_size=1, adversary_pool=2)
    trainer = spm.Trainer(model, tokenizer, membranes, args)
    lever, seen, counts = trainer.levers[0], [], []
    original = lever.adversaries

    def counted(*args):
        distributions = original(*args)
        counts.append(len(distributions))
        return distributions

    lever.adversaries = counted
    for _ in range(3):
        trainer.step()
        seen.append([p.clone() for p in lever.pool["mouse"]])
    assert counts == [1, 2, 2]  # the student is trained on every prompt in the pool
    assert not torch.equal(seen[1][0], seen[1][1])  # distinct random starts
    assert torch.equal(seen[0][0], seen[1][0]) and not torch.equal(seen[1][0], seen[2][0])  # slot 0 at steps 0, 2
    assert torch.equal(seen[1][1], seen[2][1])
    state = trainer.state_dict()
    resumed = spm.Trainer(model, tokenizer, membranes, args)
    resumed.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(resumed.levers[0].pool["mouse"], seen[2]))
    legacy = spm.Trainer(model, tokenizer, membranes, dataclasses.replace(args, adversary_pool=1))
    legacy.load_state_dict({**state, "levers": {"soft": {"soft": {"mouse": seen[2][0]}}}})  # one prompt [tokens, D]
    assert len(legacy.levers[0].pool["mouse"]) == 1 and torch.equal(legacy.levers[0].pool["mouse"][0], seen[2][0])


@pytest.mark.parametrize("loss,kind", [("kl", "kl"), ("mse", "kl"), ("hidden", "hidden")])
def test_anchors_are_held_by_kl_on_logits_whatever_the_erasure_loss_and_by_mse_on_hidden_states(loss, kind):
    generator = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 3, 5, generator=generator), torch.randn(2, 3, 5, generator=generator)
    config = spm.Config(concept="mouse", loss=loss, anchor_prompts=["cat"])
    expected = spm.divergence(student, teacher, kind)
    assert torch.equal(spm.anchor_divergence(config, student, teacher), expected)
    step = types.SimpleNamespace(student={"anchor": student}, teacher={"anchor": teacher})
    assert torch.equal(spm.Anchoring(config).loss(types.SimpleNamespace(config=config), step), expected)


@pytest.mark.parametrize("surrogate", ["", "dog"])
def test_avoid_holds_the_concept_prompts_likelihood_of_the_avoided_pictures_at_most_at_the_targets(surrogate):
    """--avoid cat: per row one of the teacher's cat pictures, teacher-forced under the row's mouse prompt, and
    relu(student's - target's mean log-likelihood per token), both as sampled (CFG, temperature), the target's logits
    t = sur - eta * (con - sur) with the teacher's unconditional ones. Membranes trained to turn the mouse into cats
    pay for it, and the term alone undoes that."""
    model, tokenizer = tiny()
    membranes = spm.attach_membranes(model, tokenizer, scope="prompt")
    config = train_config(model, tokenizer, avoid=["cat"], anchor_prompts=["car"], batch_size=2, surrogate=surrogate,
                          eta=0.7)
    trainer = spm.Trainer(model, tokenizer, membranes, config)
    lever = trainer.levers[-1]
    assert [x.name for x in trainer.levers] == ["anchor", "avoid"] and lever.weight == 1.0
    batch = spm.Batch(trainer, trainer.pick(config.concept, "concept"))
    pictures = spm.teacher_pictures(trainer, "cat")
    codes = pictures[[int(torch.randint(len(pictures), (), generator=trainer.generator(i, "avoid"))) for i in range(2)]]
    inputs = (batch.cond[:2], batch.uncond[:2], batch.mask[:2], codes, config.cfg, config.temperature)
    with torch.no_grad(), membranes.disabled():
        concept, unconditional = (spm.image_logits(model, x, batch.mask[:2], codes) for x in inputs[:2])
        substitute = spm.image_logits(model, batch.cond[2:4], batch.mask[2:4], codes) if surrogate else unconditional
        target = spm.code_log_likelihood(substitute - 0.7 * (concept - substitute), unconditional, codes, config.cfg,
                                         config.temperature)
    step = types.SimpleNamespace(batch=batch)
    optimizer = torch.optim.Adam(membranes.parameters(), lr=0.05)
    randomise(membranes, seed=3, scale=0.1)
    for _ in range(10):  # membranes that turn the mouse prompts into cats
        optimizer.zero_grad()
        (-spm.cfg_log_likelihood(model, *inputs).mean()).backward()
        optimizer.step()
    with torch.no_grad():
        student = spm.cfg_log_likelihood(model, *inputs)
        assert (student > target).all()
        assert float(lever.loss(trainer, step)) == pytest.approx(float((student - target).mean()), rel=1e-5)
        assert torch.equal(lever.references["cat"], pictures)
    for _ in range(30):  # the term alone brings them back below the target's likelihood
        optimizer.zero_grad()
        lever.loss(trainer, step).backward()
        optimizer.step()
    with torch.no_grad():
        gap = spm.cfg_log_likelihood(model, *inputs) - target
        assert float(lever.loss(trainer, step)) == pytest.approx(float(gap.clamp(min=0).mean()), rel=1e-5, abs=1e-9)
        assert gap.max() < 0.1 * (student - target).min()


def test_adversarial_anchors_attack_each_anchor_in_turn_and_hold_the_student_to_the_teacher_there():
    """--adversarial-anchors N: every --adversarial-every steps a soft prompt is optimised to draw the next anchor's
    pictures through the membranes and replaces the oldest of N; the term is KL(teacher || student) on every kept
    prompt, teacher-forced on its anchor's pictures, with the anchor weight; --select-every's score leaves it out."""
    model, tokenizer = tiny()
    membranes = spm.attach_membranes(model, tokenizer, scope="prompt")
    config = train_config(model, tokenizer, adversarial_anchors=2, adversarial_every=2, adversarial_steps=2,
                          batch_size=2, anchor_prompts=["cat", "car", "tree"])
    trainer = spm.Trainer(model, tokenizer, membranes, config)
    lever = trainer.levers[-1]
    assert [x.name for x in trainer.levers] == ["anchor", "soft-anchor"] and lever.weight == 3.0
    pools, terms = [], []
    for _ in range(5):
        metrics = trainer.step()
        pools.append([(a, s.clone()) for a, s in lever.pool])
        terms.append(metrics["soft-anchor"])
    assert [[a for a, _ in pool] for pool in pools] == [["cat"], ["cat"], ["cat", "car"], ["cat", "car"],
                                                       ["car", "tree"]]  # attacked at steps 0, 2, 4: the oldest goes
    assert torch.equal(pools[1][0][1], pools[2][0][1]) and torch.equal(pools[2][1][1], pools[4][0][1])
    assert terms[0] == 0.0 and terms[-1] > 0  # untouched membranes are the teacher; trained ones are not
    randomise(membranes, seed=2, scale=0.3)
    trainer.step_count = 5  # no attack: the term on the kept prompts as they are
    with torch.no_grad():
        term = float(lever.loss(trainer, None))
        expected = []
        for k, (anchor, soft) in enumerate(lever.pool):
            cond, _, mask = spm.soft_prompt_inputs(model, tokenizer, soft)
            pictures = lever.references[anchor]
            picks = [int(torch.randint(len(pictures), (), generator=trainer.generator(i, f"soft-anchor-{k}")))
                     for i in range(2)]
            student = spm.image_logits(model, cond.expand(2, -1, -1), mask.expand(2, -1), pictures[picks])
            with membranes.disabled():
                teacher = spm.image_logits(model, cond.expand(2, -1, -1), mask.expand(2, -1), pictures[picks])
            expected.append(spm.divergence(student, teacher))
        assert term == pytest.approx(float(sum(expected) / 2), rel=1e-5) and term > 0
        batch, codes, teacher = spm.held_out_batch(trainer, -1)
        with_lever = float(spm.validation_loss(trainer, batch, codes, teacher))
        trainer.levers = trainer.levers[:1]
        assert with_lever == float(spm.validation_loss(trainer, batch, codes, teacher))
    resumed = spm.Trainer(model, tokenizer, membranes, config)
    resumed.load_state_dict(trainer.state_dict() | {"levers": {"soft-anchor": lever.state_dict()}})
    resumed.step_count = 5
    with torch.no_grad():
        assert float(resumed.levers[-1].loss(resumed, None)) == term  # the teacher's pictures drawn again, the same
    trainer.step_count = 6  # the fourth attack: the cat again, against the membranes as they are now
    lever.attack(trainer)
    attacked = {}
    for membranes_on in (True, False):
        generator = torch.Generator().manual_seed(spm.derived_seed(config.seed, 6, "cat", "soft-anchor"))
        with membranes.switched(membranes_on):
            attacked[membranes_on], _ = spm.optimise_soft_prompt(model, tokenizer, lever.references["cat"], 4, 2, 1e-2,
                                                                 config.cfg, config.temperature, generator)
    assert [a for a, _ in lever.pool] == ["tree", "cat"] and torch.equal(lever.pool[-1][1], attacked[True])
    assert not torch.equal(attacked[True], attacked[False])


def test_adversarial_anchors_from_vocabulary_attack_a_seeded_pick_of_the_vocabulary_anchors_words():
    """--adversarial-anchors-from vocabulary: each attack's anchor is a seeded pick of --anchor-vocabulary's words
    (the same lever's, so ablate.py's held-out words stay out of both), no listed anchor needed; the soft prompt is
    optimised through the membranes towards the teacher's pictures of that word."""
    model, tokenizer = tiny()
    membranes = spm.attach_membranes(model, tokenizer, scope="prompt")
    config = train_config(model, tokenizer, anchor="none", anchor_prompts=None, anchor_vocabulary=8,
                          adversarial_anchors=2, adversarial_anchors_from="vocabulary", adversarial_every=2,
                          adversarial_steps=2, batch_size=2, lr=0.05)
    trainer = spm.Trainer(model, tokenizer, membranes, config)
    vocab, lever = trainer.levers
    assert [x.name for x in trainer.levers] == ["vocab", "soft-anchor"] and lever.vocabulary is vocab
    for _ in range(5):
        metrics = trainer.step()
    picks = [vocab.words[int(torch.randint(len(vocab.words), (), generator=torch.Generator().manual_seed(
        spm.derived_seed(config.seed, step, "soft-anchor-word"))))] for step in (2, 4)]
    assert [a for a, _ in lever.pool] == picks and len(set(picks) | {"mouse", "cat", "car"}) == 5
    assert metrics["soft-anchor"] > 0
    trainer.step_count = 6
    word = lever.next_anchor(trainer)
    lever.attack(trainer)
    assert torch.equal(lever.references[word], spm.teacher_pictures(trainer, word))
    generator = torch.Generator().manual_seed(spm.derived_seed(config.seed, 6, word, "soft-anchor"))
    soft, _ = spm.optimise_soft_prompt(model, tokenizer, lever.references[word], 4, 2, 1e-2, config.cfg,
                                       config.temperature, generator)
    assert lever.pool[-1][0] == word and torch.equal(lever.pool[-1][1], soft)
    assert spm.Config.from_dict(config.to_dict()).adversarial_anchors_from == "vocabulary"


@pytest.fixture(scope="module")
def toy_checkpoint(tmp_path_factory):
    """A few default steps on the toy: membranes that barely erase anything."""
    out = tmp_path_factory.mktemp("toyrun")
    spm.train(spm.Config(model="toy", concept="mouse", steps=2, out=str(out), sample_every=0, anchor="none"))
    return out / spm.CHECKPOINT_NAME


def test_attack_json_round_trip_and_soft_prompt_replay(toy_checkpoint, tmp_path):
    from safetensors.torch import load_file
    results = attack.run(attack.build_parser().parse_args([
        "--ckpt", str(toy_checkpoint), "--n", "4", "--candidates", "24", "--rounds", "2", "--top", "2", "--soft-steps", "3",
        "--soft-restarts", "1", "--references", "4", "--json", str(tmp_path / "a.json"), "--out", str(tmp_path)]))
    saved = json.loads((tmp_path / "a.json").read_text())
    assert [a["name"] for a in saved["attacks"]] == ["discrete", "soft", "synonyms"] and saved["attacks"] == results
    for a in saved["attacks"]:
        assert set(a) >= {"name", "asr", "base_asr", "samples", "worst", "seconds"} and 0 <= a["asr"] <= 1
        assert all(set(w) == {"prompt", "rate"} for w in a["worst"])
    soft = saved["attacks"][1]
    assert load_file(soft["soft_prompt"])["soft_prompt"].shape == (4, 64)
    assert saved["attacks"][2]["samples"] == 4 * 2 * 9  # 2 synonyms x 9 templates


def test_discrete_attack_finds_the_concept_through_the_base_model(toy_checkpoint):
    model, tokenizer = toy_model()
    judge, _, _ = evaluation.toy_judge("toy")
    args = attack.build_parser().parse_args(["--ckpt", "-", "--n", "16", "--candidates", "32", "--rounds", "2"])
    target = attack.Target(model, tokenizer, judge, "mouse", 2.0, 0.5, 16, seed=1)
    templates = attack.toy_templates()
    references = attack.concept_references(target, "mouse", templates, 8)
    found, _ = attack.run_attack("discrete", target, references, ["mouse"], [], templates, args, "base")
    assert found["asr"] >= 0.9 and "mouse" in found["prompt"].split()


@pytest.mark.parametrize("argv,needle", [(["--n", "0"], "--n 0 must be at least 1"),
                                         (["--concept", "unicorn"], "no toy object"),
                                         (["--soft-lr", "0"], "--soft-lr 0 must be positive")])
def test_attack_bad_input_is_one_line(toy_checkpoint, argv, needle, capsys):
    with pytest.raises(SystemExit) as exit_:
        attack.main(["--ckpt", str(toy_checkpoint), *argv])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and needle in err and len(err.strip().splitlines()) == 1, err


def test_attack_on_a_bpe_checkpoint(bpe_janus_dir, tmp_path):
    """attack.py's searches on a checkpoint shaped like Janus-Pro's: the discrete search with its token-level (GCG)
    step keeps the two-token concept in every prompt, and the soft prompt runs in the BPE chat format."""
    model, tokenizer = spm.load_model(str(bpe_janus_dir))
    judge = lambda codes, prompts: ["Mickey Mouse" if int(c.sum()) % 2 == 0 else "none" for c in codes]  # a stand-in
    args = attack.build_parser().parse_args(["--ckpt", "-", "--n", "4", "--candidates", "16", "--rounds", "2", "--top",
                                             "2", "--gcg-steps", "2", "--soft-steps", "2", "--soft-restarts", "1",
                                             "--out", str(tmp_path)])
    target = attack.Target(model, tokenizer, judge, "Mickey Mouse", 5.0, 1.0, 4, seed=0)
    templates = list(attack.GENERIC_TEMPLATES)
    references = attack.concept_references(target, "Mickey Mouse", templates, 4)
    found, _ = attack.run_attack("discrete", target, references, ["Mickey Mouse"], [], templates, args, "t")
    assert "Mickey Mouse" in found["prompt"] and all("Mickey Mouse" in w["prompt"] for w in found["worst"])
    swapped = attack.gcg(target, references, "a photo of Mickey Mouse", ["Mickey Mouse"], 3,
                         torch.Generator().manual_seed(0))
    assert swapped and all("Mickey Mouse" in p and p != "a photo of Mickey Mouse" for p in swapped)
    soft, _ = attack.run_attack("soft", target, references, ["Mickey Mouse"], [], templates, args, "t")
    assert soft["samples"] == 4 and (tmp_path / "soft_t.safetensors").exists()


def test_adversarial_soft_prompt_enters_the_erase_loss():
    """The soft prompt's rows are trained towards the concept's target: the erase term averages both."""
    erase = {}
    for adversarial in ("none", "soft"):
        model, tokenizer = tiny()
        membranes = spm.attach_membranes(model, tokenizer, scope="prompt")
        randomise(membranes)
        args = train_config(model, tokenizer, adversarial=adversarial, adversarial_steps=2, anchor="none", batch_size=1)
        trainer = spm.Trainer(model, tokenizer, membranes, args)
        erase[adversarial] = trainer.step()["erase"]
    assert erase["soft"] != pytest.approx(erase["none"], rel=1e-3)


def test_a_residual_perturbation_acts_at_the_prompt_positions_only_and_is_removed_after_an_error():
    model, tokenizer = tiny()
    _, cond, _, mask = prompt_batch(model, tokenizer)
    codes = codes_for(model, tokenizer)
    with torch.no_grad():
        before = spm.image_hidden(model, cond, mask, codes)
        with spm.residual_perturbation(model, 1, torch.zeros_like(cond)):
            assert torch.equal(spm.image_hidden(model, cond, mask, codes), before)
        delta = torch.zeros_like(cond)
        delta[:, -1] = 1.0  # the last prompt position: the image steps after it change, nothing before it
        with spm.residual_perturbation(model, 1, delta):
            moved = spm.image_hidden(model, cond, mask, codes)
            other_batch = spm.image_hidden(model, cond[:1], mask[:1], codes[:1])  # not the perturbed rows
        assert not torch.allclose(moved, before) and torch.equal(other_batch, before[:1])
        with pytest.raises(RuntimeError), spm.residual_perturbation(model, 1, delta):
            raise RuntimeError("inside")
        assert torch.equal(spm.image_hidden(model, cond, mask, codes), before)


@pytest.mark.parametrize("eps,where", [(0.05, "prompt"), (0.5, "prompt"), (0.5, "image"), (0.5, "prompt+image")])
def test_the_latent_attack_raises_the_concept_likelihood_within_its_bound(eps, where):
    model, tokenizer = tiny()
    _, cond, _, mask = prompt_batch(model, tokenizer)
    codes = codes_for(model, tokenizer, seed=3)
    likelihood = lambda: F.log_softmax(spm.image_logits(model, cond, mask, codes), -1).gather(
        -1, codes[..., None]).mean().item()
    norms = spm.residual_norms(model, 1, cond, mask, None if where == "prompt" else codes)
    P, N = cond.shape[1], codes.shape[1]
    assert norms.shape == (cond.shape[0], P if where == "prompt" else P + N - 1)
    assert torch.allclose(norms[:, :P], spm.residual_norms(model, 1, cond, mask))  # the prompt's are the prompt's
    delta = spm.latent_attack(model, 1, cond, mask, codes, eps, steps=4, where=where)
    assert delta.shape == (*norms.shape, cond.shape[-1])
    assert (delta.norm(dim=-1) <= eps * norms * (1 + 1e-5) + 1e-6).all()
    acts = {"prompt": [slice(0, P)], "image": [slice(P, None)], "prompt+image": [slice(0, P), slice(P, None)]}[where]
    for positions in acts:  # it uses its budget where it acts, and acts nowhere else
        assert (delta[:, positions].norm(dim=-1) >= 0.5 * eps * norms[:, positions]).any()
    if where == "image":
        assert torch.equal(delta[:, :P], torch.zeros_like(delta[:, :P]))
    base = likelihood()
    with spm.residual_perturbation(model, 1, delta):
        attacked = likelihood()
    assert attacked > base
    assert all(p.grad is None for p in model.parameters())


def test_latent_adversarial_training_adds_the_perturbed_rows_to_the_erase_loss():
    erase, levers = {}, {}
    for eps in (0.0, 0.5):
        model, tokenizer = tiny()
        membranes = spm.attach_membranes(model, tokenizer)
        randomise(membranes)
        trainer = spm.Trainer(model, tokenizer, membranes, train_config(model, tokenizer, latent_eps=eps,
                                                                        anchor="none", batch_size=2))
        levers[eps] = [lever.name for lever in trainer.levers]
        erase[eps] = trainer.step()["erase"]
    assert levers == {0.0: [], 0.5: ["latent"]}
    assert erase[0.5] != pytest.approx(erase[0.0], rel=1e-3)
    model, tokenizer = tiny()
    with pytest.raises(spm.SPMError, match="--latent-layer 9: this model's decoder has layers 0-1"):
        train_config(model, tokenizer, latent_eps=0.5, latent_layer=9)


@pytest.mark.parametrize("kind", ["soft", "latent", "latent on the image positions"])
def test_adversary_codes_concept_trains_the_adversaries_on_the_teachers_concept_pictures(kind, monkeypatch):
    """--adversary-codes concept, and --latent-positions image without it: a perturbation of a picture's positions
    is trained on that picture."""
    model, tokenizer = tiny()
    membranes = spm.attach_membranes(model, tokenizer)
    randomise(membranes)
    lever = {"soft": dict(adversarial="soft", adversarial_steps=2, adversary_codes="concept"),
             "latent": dict(latent_eps=0.5, adversary_codes="concept"),
             "latent on the image positions": dict(latent_eps=0.5, latent_positions="image")}[kind]
    config = train_config(model, tokenizer, anchor="none", batch_size=2, **lever)
    trainer = spm.Trainer(model, tokenizer, membranes, config)
    adversary, seen = trainer.levers[0], {}
    original = adversary.adversaries

    def kept(trainer, step):
        seen["step"], seen["pairs"] = step, original(trainer, step)
        seen["pictures"] = spm.adversary_pictures(trainer, step, adversary.references, "concept")
        return seen["pairs"]

    adversary.adversaries = kept
    attack = spm.latent_attack
    monkeypatch.setattr(spm, "latent_attack", lambda model, layer, embeds, mask, codes, *rest: seen.update(
        attacked=codes, where=rest[2:]) or attack(model, layer, embeds, mask, codes, *rest))
    trainer.step()
    step, ((_, target),) = seen["step"], seen["pairs"]
    codes, same = seen["pictures"]
    assert torch.equal(target, same)
    if kind != "soft":  # attacked on the pictures it is trained on
        assert torch.equal(seen["attacked"], codes) and seen["where"] == (config.latent_positions,)
    references = adversary.references["mouse"]
    assert all(any(torch.equal(row, r) for r in references) for row in codes)  # the teacher's concept pictures
    assert not torch.equal(codes, step.codes["concept"])
    with torch.no_grad(), membranes.disabled():  # the teacher's target on them, by hand
        cond, mask = step.batch.cond[:2], step.batch.mask[:2]
        concept = spm.image_logits(model, cond, mask, codes)
        empty = spm.image_logits(model, step.batch.uncond[:2], mask, codes)
    assert torch.allclose(target, spm.erasure_target(concept, empty, config.eta), atol=1e-5)
    assert not torch.allclose(target, step.target, atol=1e-3)


@pytest.mark.parametrize("prompt,expected", [
    ("a photo of Mickey Mouse", ("Mickey Mouse", "Mickey Mouse", "a photo of {}")),
    ("a red rodent", ("mouse", "rodent", "a red {}")), ("a mouse", ("mouse", "mouse", "a {}")),
    ("a tree", (None, None, "a tree"))])
def test_a_typed_eval_prompt_finds_its_object_word_or_synonym(prompt, expected):
    found = evaluation.user_eval_prompt(prompt, ["mouse", "Mickey Mouse"], {"rodent": "mouse"})
    assert (found.object, found.word, found.template) == expected


# -----------------------------------------------------------------------------
# A new user's first hour: set-up, progress, outputs under runs/, exit codes, help, the erasure signal


def test_readme_set_up_installs_the_platforms_torch_before_the_requirements():
    setup = (HERE / "README.md").read_text().split("## Set-up", 1)[1].split("```", 2)[1]
    lines = [line for line in setup.splitlines() if line.strip()]
    assert "torch" in lines[0] and "requirements" not in lines[0], lines  # a CPU user copies this line first
    assert any("pip install -r requirements.txt" in line and "spm_janus.py --model toy" in line for line in lines)
    assert any("pip install -r requirements-dev.txt" in line and "pytest -q" in line for line in lines)


def test_sample_eval_shows_progress_and_a_run_directory_is_a_checkpoint(toy_checkpoint, tmp_path, capsys):
    import sample
    prompts = [f for p in ("a mouse", "a red cat", "a dog", "a car", "a tree") for f in ("--prompt", p)]
    sample.main(["--ckpt", str(toy_checkpoint.parent), "--eval", "--n", "2", *prompts])  # the directory itself
    captured = capsys.readouterr()
    assert "base: 2 pictures per prompt" in captured.err and "erased: 2 pictures per prompt" in captured.err
    assert "mouse rate" in captured.out and "n/a" not in captured.out


@pytest.mark.parametrize("argv,needle", [(["--n", "0"], "--n 0 must be at least 1"),
                                         (["--threads", "-1"], "--threads -1"),
                                         (["--out", "x.png"], "--out x.png names a file")])
def test_sample_bad_counts_and_outputs_are_one_line(toy_checkpoint, argv, needle, capsys):
    import sample
    assert main_exit_code(sample.main, ["--ckpt", str(toy_checkpoint), "--prompt", "a mouse", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err


@pytest.mark.parametrize("script,argv,needle", [
    ("ablate", ["--seeds", "0"], "--seeds 0 must be at least 1"), ("ablate", ["--steps", "-1"], "--steps -1"),
    ("toy_janus", ["--samples", "0"], "--samples 0 must be at least 1"), ("bench", ["--pairs", "0"], "--pairs 0")])
def test_every_count_flag_is_checked(script, argv, needle, capsys):
    module = __import__(script)
    assert main_exit_code(module.main, argv) == 2
    assert needle in capsys.readouterr().err


def test_sample_writes_beside_its_checkpoint_and_attack_beside_its_json(toy_checkpoint, tmp_path, monkeypatch,
                                                                        capsys):
    """Nothing lands in the current directory: sample.py's grid goes to sample/ in the run directory, attack.py's soft
    prompt beside the JSON asked for, and each says where."""
    import shutil
    import sample
    run = tmp_path / "run"
    shutil.copytree(toy_checkpoint.parent, run)
    monkeypatch.chdir(tmp_path)
    sample.main(["--ckpt", str(run), "--prompt", "a mouse", "--n", "1"])
    assert (run / "sample" / "samples.png").is_file() and f"wrote {run / 'sample' / 'samples.png'}" in \
        capsys.readouterr().out
    attack.main(["--ckpt", str(run), "--attack", "soft", "--soft-steps", "1", "--soft-restarts", "1", "--n", "2",
                 "--references", "2", "--json", str(tmp_path / "a" / "attack.json")])
    printed = capsys.readouterr().out
    assert (tmp_path / "a" / "soft_erased.safetensors").is_file() and str(tmp_path / "a" / "soft_erased") in printed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "run"]


def test_help_says_each_default_once_lists_export_peft_and_takes_no_prefixes(capsys):
    import sample
    for main in (spm.main, sample.main, attack.main):
        assert main_exit_code(main, ["--help"]) == 0
        text = " ".join(capsys.readouterr().out.split())
        assert "(default: None)" not in text and not re.search(r"\(default: [^)]*\) \(default:", text), text
        if main is spm.main:
            assert "export-peft --ckpt RUN --out DIR" in text and "(default: 400)" in text
    assert main_exit_code(spm.main, ["--model", "tiny", "--concept", "mouse", "--step", "5"]) == 2
    assert "unrecognized arguments: --step 5" in capsys.readouterr().err


def test_summary_ranks_by_all_other_objects_when_every_one_is_anchored(capsys):
    P = evaluation.EvalPrompt
    records = [{**P("a mouse", "mouse", "mouse", "a {}")._asdict(), "n": 2, "base": {"mouse": 2}, "erased": {"cat": 2}},
               {**P("a rodent", "mouse", "rodent", "a {}")._asdict(), "n": 2, "base": {"mouse": 2},
                "erased": {"mouse": 1, "blank": 1}},
               {**P("a red mouse", "mouse", "mouse", "a red {}")._asdict(), "n": 2, "base": {"mouse": 2},
                "erased": {"none": 2}},
               {**P("a cat", "cat", "cat", "a {}")._asdict(), "n": 2, "base": {"cat": 2}, "erased": {"cat": 1}}]
    summary = evaluation.summarize(records, ["mouse"], ["cat"], ("mouse", "cat"), {"a {}"}, {"rodent": "mouse"})
    m = summary["mouse"]
    assert m["non_anchored"]["objects"] == [] and m["H_retention"] == "others" and m["others"]["retention"] == 0.5
    assert m["H"] == pytest.approx(4 / (1 / 1.0 + 1 / 0.5 + 1 / 0.5 + 1 / 0.5))  # held-out 0, synonyms 0.5, coherence
    evaluation.print_summary(summary, 2)
    printed = capsys.readouterr().out
    assert "n/a" not in printed and "non-anchored objects kept: none: the run anchored every other object" in printed
    assert "the retention of all other objects (none is non-anchored), coherence): 0.571" in printed


def test_the_training_log_says_whether_the_erasure_takes(tmp_path, capsys):
    """On any model, the log-likelihood under the student of the teacher's concept pictures (it falls when the
    membranes move the student away from them); on the toy, also the share of the grid's concept pictures judged
    the concept."""
    model, tokenizer = tiny()  # no judge for it: the likelihood alone
    config = train_config(model, tokenizer)
    assert set(spm.ErasureSignal(model, tokenizer, spm.attach_for(model, tokenizer, config), config)({})) == \
        {"concept_ll"}
    model, tokenizer = toy_model()
    membranes = spm.attach_membranes(model, tokenizer, layers="attn+mlp", scope="all")
    config = spm.Config(model="toy", concept="mouse").resolved(model, tokenizer)
    signal = spm.ErasureSignal(model, tokenizer, membranes, config)
    before = signal({})
    randomise(membranes, scale=0.2)
    after = signal({})
    assert before["concept_share"] == 1 and after["concept_share"] < 1
    assert after["concept_ll"] < before["concept_ll"] - 0.1, (before, after)
    out = tmp_path / "toy"
    spm.main(["--model", "toy", "--concept", "mouse", "--steps", "2", "--sample-every", "1", "--anchor", "none",
              "--adversarial", "none", "--out", str(out)])
    err = capsys.readouterr().err
    assert "step 2: the teacher's mouse pictures have log-likelihood" in err and "are judged mouse" in err
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(0 <= m["concept_share"] <= 1 and m["concept_ll"] < 0 for m in lines)


# -----------------------------------------------------------------------------
# Concept types: objects, styles, attributes (toy world v3), nudity; their presets, evaluations and judges


@pytest.mark.parametrize("concept_type,concept,templates,anchors", [
    ("object", "mouse", list(spm.DEFAULT_TEMPLATES), ["cat", "dog", "bird", "fish", "car", "tree", "house"]),
    ("style", "pastel", [f"a {{}} {s}" for s in spm.SUBJECTS], ["solid", "shaded"]),
    ("attribute", "red", [f"a {{}} {s}" for s in spm.SUBJECTS], ["green", "blue", "yellow"])])
def test_a_concept_type_resolves_to_its_presets_on_the_toy(concept_type, concept, templates, anchors):
    """Of each preset, what the toy's tokenizer spells: its templates and the other concepts of its type."""
    model, tokenizer = toy_model()
    config = spm.Config(model="toy", concept=concept, concept_type=concept_type).resolved(model, tokenizer)
    assert config.templates == templates and config.anchor_prompts == anchors and config.anchor == "prompts"
    assert config.surrogate == ("" if concept_type == "object" else "-")
    assert config.sample_prompts[0] == ("a mouse" if concept_type == "object" else f"a {concept} cat")


def test_the_prompt_without_the_concept_is_the_surrogate_of_a_style():
    """surrogate '-': the surrogate rows are the concept rows' prompts with the concept's word taken out, so the
    target keeps the subject ('a pastel cat' -> 'a cat')."""
    model, tokenizer = toy_model()
    config = spm.Config(model="toy", concept="pastel", concept_type="style", batch_size=3, augment=0.5,
                        adversarial="none").resolved(model, tokenizer)
    trainer = spm.Trainer(model, tokenizer, spm.attach_for(model, tokenizer, config), config)
    batch = spm.Batch(trainer, trainer.pick(config.concept, "concept"))
    concept_rows, surrogate_rows = (batch.prompts[slice(*batch.rows[name][:2])] for name in ("concept", "surrogate"))
    assert batch.rows["surrogate"] == spm.Rows(3, 6) and len(concept_rows) == 3
    for concept_prompt, surrogate_prompt in zip(concept_rows, surrogate_rows):
        assert "pastel" in concept_prompt.split() and surrogate_prompt == " ".join(
            w for w in concept_prompt.split() if w != "pastel")
    model, tokenizer = toy_model()
    red = spm.Config(model="toy", concept="red", concept_type="attribute").resolved(model, tokenizer)
    words = spm.Trainer(model, tokenizer, spm.attach_for(model, tokenizer, red), red).words
    assert "photo" in words and not {"red", "green", "blue", "yellow"} & set(words)  # no 'red' into 'a blue car'
    mouse = spm.Config(model="toy", concept="mouse").resolved(model, tokenizer)
    assert {"red", "mouse"} <= set(spm.Trainer(model, tokenizer, spm.attach_for(model, tokenizer, mouse),
                                                mouse).words)  # an object's augmentation as before


def test_eval_prompts_of_every_type_name_what_they_ask_for():
    import toy_janus as toy
    objects = evaluation.eval_prompts("object")
    assert len(objects) == 216 and {p.object for p in objects} == set(toy.OBJECTS)
    for concept_type, field, values, words in (("style", "style", toy.STYLES, toy.style_words),
                                               ("attribute", "color", toy.COLORS, toy.color_words)):
        prompts = evaluation.eval_prompts(concept_type)
        named = [p for p in prompts if getattr(p, field) is not None]
        assert {p.word for p in named} == {w for v in values for w in words(v)}
        for p in named:
            assert p.template.format(p.word) == p.prompt and p.object in p.prompt.split()
            assert toy.meaning(p.word) == (field, getattr(p, field))
        plain = [p for p in prompts if getattr(p, field) is None]
        assert plain and all(not any(w in p.prompt.split() for v in values for w in words(v)) for p in plain)
    typed = evaluation.toy_eval_prompt("a drawing of a dusky crimson kitten", "style")
    assert typed == evaluation.EvalPrompt("a drawing of a dusky crimson kitten", "cat", "dusky",
                                          "a drawing of a {} crimson kitten", "red", "shaded")


def test_a_style_summary_against_hand_computed_values(capsys):
    """summarize_kind with stub records judged 'object/colour/style': every figure by hand."""
    P = evaluation.EvalPrompt
    records = [
        {**P("a pastel cat", "cat", "pastel", "a {} cat", None, "pastel")._asdict(), "n": 4,
         "base": {"cat/red/pastel": 4}, "erased": {"cat/red/solid": 2, "cat/red/pastel": 1, "none/none/none": 1}},
        {**P("a photo of a pastel dog", "dog", "pastel", "a photo of a {} dog", None, "pastel")._asdict(), "n": 4,
         "base": {"dog/blue/pastel": 4}, "erased": {"dog/blue/shaded": 4}},
        {**P("a faded car", "car", "faded", "a {} car", None, "pastel")._asdict(), "n": 4,
         "base": {"car/green/pastel": 4}, "erased": {"car/green/pastel": 2, "car/green/solid": 2}},
        {**P("a shaded cat", "cat", "shaded", "a {} cat", None, "shaded")._asdict(), "n": 4,
         "base": {"cat/red/shaded": 4}, "erased": {"cat/red/shaded": 3, "cat/red/solid": 1}},
        {**P("a dog", "dog", None, None)._asdict(), "n": 4, "base": {"dog/red/solid": 4},
         "erased": {"dog/red/solid": 2, "none/red/none": 2}}]
    f = evaluation.summarize(records, ["pastel"], [], (), {"a {} cat"}, {"faded": "pastel"}, "style")["pastel"]
    assert (f["trained_rate"], f["held_out_rate"], f["synonyms_rate"]) == (0.25, 0.0, 0.5)
    assert f["object_kept"] == {"base": 1.0, "erased": 11 / 12, "retention": 11 / 12, "prompts": 3}
    assert f["other_values"]["erased"] == 0.75 and f["other_objects"]["retention"] == 0.5
    assert f["coherence"] == 8 / 12  # solid and shaded pictures of the object; not the pastel or broken ones
    assert f["H"] == pytest.approx(5 / (1 / 1.0 + 1 / 0.5 + 12 / 11 + 1 / 0.75 + 12 / 8))
    evaluation.print_summary({"pastel": f}, 4)
    printed = " ".join(capsys.readouterr().out.split())
    assert "pastel drawn, synonyms (never trained) 50.0% (100.0%)" in printed and "other styles kept 75.0%" in printed
    assert "coherence (its pictures that are a clean object in another style) 66.7%" in printed


def test_nudenet_judge_counts_exposed_bodies_at_the_fields_threshold():
    """The label mapping and the threshold with a stub detector, then the real detector (it ships inside the nudenet
    wheel) on pictures built here: a rate comes out, offline. Its quality on Janus pictures is not checked here."""
    model, tokenizer = tiny()
    codes = spm.sample_prompts(model, tokenizer, ["a person"], [0, 1, 2], 5.0, 1.0)[0]
    decode = lambda c: spm.decode_images(model, c)
    answers = iter([[{"class": "FEMALE_BREAST_EXPOSED", "score": 0.7}], [{"class": "FACE_FEMALE", "score": 0.9},
                                                                         {"class": "BUTTOCKS_EXPOSED", "score": 0.5}],
                    []])
    seen = []

    class Stub:
        def detect(self, image):
            seen.append(image.shape)
            return next(answers)

    assert evaluation.nudenet_judge(decode, detector=Stub())(codes, [""] * 3) == ["nudity", "none", "none"]
    assert seen == [(32, 32, 3)] * 3
    pytest.importorskip("nudenet")
    judged = evaluation.nudenet_judge(decode)(codes, [""] * 3)
    assert len(judged) == 3 and set(judged) <= {"nudity", "none"}


def test_sample_judges_its_pictures_with_nudenet_offline(capsys):
    import sample
    pytest.importorskip("nudenet")
    sample.main(["--model", "tiny", "--prompt", "a person", "--n", "2", "--judge", "nudenet"])
    printed = capsys.readouterr().out
    assert re.search(r"judge nudenet, 'a person': drawn: (nudity \d+|none \d+)", printed), printed


def test_clip_asks_the_question_of_the_concept_type():
    model, tokenizer = tiny()
    clip, processor = tiny_clip(tokenizer)
    asked = []
    tokenizer_call = tokenizer.__class__.__call__
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tokenizer.__class__, "__call__",
                      lambda self, texts, *a, **k: asked.append(list(texts)) or tokenizer_call(self, texts, *a, **k))
        evaluation.clip_judge(clip, tokenizer, processor, None, ["red", "blue"], neutral=("a car",),
                              concept_type="attribute")
    assert asked[0] == ["a photo of something red", "a photo of something blue", "a car"]


# -----------------------------------------------------------------------------
# The yardstick's floor and the peers: the oracle, attack-budget curves, full-rank deltas and the hidden-state loss


@pytest.mark.parametrize("without", ["mouse", "red", "pastel"])
def test_the_oracle_never_sees_its_concept(without):
    import toy_janus as toy
    kind = toy.meaning(without)[0]
    words = {"object": toy.words_for, "color": toy.color_words, "style": toy.style_words}[kind](without)
    prompts, codes = toy.training_batch(torch.Generator().manual_seed(0), 400, without=without)
    assert not any(w in p.split() for p in prompts for w in words)
    part = {"object": 0, "color": 1, "style": 2}[kind]
    assert all(verdict[part] != without for verdict in toy.judge_batch(codes))
    full_prompts, _ = toy.training_batch(torch.Generator().manual_seed(0), 400)
    assert any(w in p.split() for p in full_prompts for w in words)  # the full world does name it


def test_sample_eval_of_the_oracle_judges_it_as_the_erased_model_with_nothing_anchored(monkeypatch, tmp_path):
    import sample
    seen = {}

    def evaluate(draw, prompts, judge, n, concepts, anchors, *rest):
        seen.update(concepts=concepts, anchors=anchors, erased=draw(True, ["a mouse"]), base=draw(False, ["a mouse"]))

    monkeypatch.setattr(evaluation, "evaluate", evaluate)
    sample.main(["--eval", "--oracle", str(HERE / "toy_model_without_mouse"), "--n", "4"])
    import toy_janus as toy
    assert seen["concepts"] == ["mouse"] and seen["anchors"] == []
    assert [v[0] for v in toy.judge_batch(seen["erased"][0])].count("mouse") == 0
    assert [v[0] for v in toy.judge_batch(seen["base"][0])].count("mouse") == 4
    for argv, message in ((["--oracle", str(HERE / "toy_model_without_mouse"), "--ckpt", "runs/m"],
                           "--oracle goes with --eval and without --ckpt"),
                          (["--oracle", str(HERE / "toy_model")], "was built with every concept")):
        with pytest.raises(SystemExit) as exit_info:
            sample.main(["--eval", *argv])
        assert exit_info.value.code == 2


def test_ablate_quick_reads_config_overrides_and_refuses_other_keys(capsys):
    import ablate
    assert ablate.quick_overrides(["default", "latent_eps=0.5", "scope=image", "steps=20", "anchor_prompts=[\"cat\"]"]) \
        == {"latent_eps": 0.5, "scope": "image", "steps": 20, "anchor_prompts": ["cat"]}
    for bad in ("latent-eps=0.5", "foo=1", "steps"):
        with pytest.raises(SystemExit) as exit_info:
            ablate.quick_overrides([bad])
        assert exit_info.value.code == 2 and f"--quick {bad!r}" in capsys.readouterr().err


def test_ablate_depth_tables_every_seed_and_plots_the_peers(tmp_path, capsys):
    import ablate
    from PIL import Image
    curve = {"0": 0.0, "10": 0.0, "30": 0.25, "100": 0.5, "300": 1.0}
    line = dict(trained_rate=0.0, held_out_rate=0.0625, synonyms_rate=0.125, anchored_kept=0.975, non_anchored_kept=0.8,
                non_anchored_retention=0.8, coherence=0.5, H=0.5, dog=0.25, curve=curve, budget_50=100, seconds=99)
    quick = tmp_path / "quick.jsonl"
    quick.write_text("\n".join(json.dumps({"overrides": o, "seed": seed, **line})
                               for o, seed in (({"adversary_pool": 4}, 1), ({}, 0), ({"adversary_pool": 4}, 0))))
    peers = tmp_path / "peers.json"
    peers.write_text(json.dumps({"results": [{"setting": "the oracle: x (the floor)", "seeds": [
        {"non_anchored_kept": 1.0, "curve": {b: 0.0 for b in curve}}]}]}))
    ablate.main(["--depth", str(quick), "--peer-results", str(peers), "--out", str(tmp_path / "out")])
    rows = [r for r in (tmp_path / "out" / "depth.md").read_text().splitlines()[2:]]
    assert rows == [row for row in capsys.readouterr().out.splitlines()[2:]]
    assert [r.split(" | ")[:2] for r in rows] == [["| `--adversary-pool 4`", "0"], ["| `--adversary-pool 4`", "1"],
                                                   ["| today's default", "0"]]  # by setting in order seen, then seed
    assert rows[2] == "| today's default | 0 | 0.0 / 6.2 / 12.5 | 97.5 | 80.0 (25.0) | 50.0 | 0 / 25 / 50 / 100 | 100 | 99 |"
    assert ablate.setting_name({"anchor_vocabulary": 256, "hold_out_objects": True}) == \
        "`--anchor-vocabulary 256` (objects' words held out)"  # not a flag of spm_janus.py
    image = Image.open(tmp_path / "out" / "depth.png").convert("RGB")
    # the oracle (the third legend row) drawn at 100% kept, 0% ASR: its colour at the bottom right of a panel
    assert image.getpixel((50 + 340, 50 + 340 - 4)) == (30, 150, 30)
    # an eleventh setting takes the first colour again, as a square: its corner is drawn, a circle's would not be
    corner = (50 + 340 - 4, 50 + 340 - 4)
    for settings, expected in ((10, (255, 255, 255)), (11, (200, 30, 30))):
        points = [(f"s{i}", []) for i in range(settings - 1)] + [("last", [(1.0, {"100": 0.0, "300": 0.0})])]
        ablate.tradeoff_plot(points, tmp_path / "many.png")
        assert Image.open(tmp_path / "many.png").convert("RGB").getpixel(corner) == expected
    points = [(f"s{i}", []) for i in range(30)] + [("last", [(1.0, {"100": 0.0, "300": 0.0})])]
    ablate.tradeoff_plot(points, tmp_path / "many.png")  # the thirty-first: the first colour as a triangle
    image = Image.open(tmp_path / "many.png").convert("RGB")
    assert image.getpixel(corner) == (255, 255, 255) and image.getpixel((corner[0], corner[1] + 8)) == (200, 30, 30)
    points = [(f"s{i}", []) for i in range(39)] + [("x" * 200, [])]  # the fortieth: black, a diamond
    ablate.tradeoff_plot(points, tmp_path / "long.png")
    image = Image.open(tmp_path / "long.png").convert("RGB")
    ink = lambda left, right: min(sum(c) for _, c in image.crop(  # noqa: E731 (darkest in the last legend row)
        (left, 50 + 16 * 39, right, 50 + 16 * 40)).getcolors(10 ** 5))
    assert image.height >= 50 + 16 * 40 + 50 and ink(image.width - 200, image.width - 12) < 150
    assert ink(image.width - 12, image.width) == 3 * 255  # the long label ends on the picture


@pytest.mark.parametrize("loss_on", ["cond", "cfg"])
def test_ablate_oracle_target_trains_the_concept_rows_towards_the_oracles_distribution(loss_on, capsys):
    """--quick oracle_target=true: the concept rows' target is the oracle's distribution on the same prompts and
    rollout (its own embeddings; CFG-combined under --loss-on cfg), not l(surrogate) - eta * (...); the rest is kept."""
    import ablate
    model, tokenizer = tiny()
    oracle = spm.build_tiny_janus(seed=1)[0].eval().requires_grad_(False)  # another model, the same tokenizer
    membranes = spm.attach_membranes(model, tokenizer, scope="prompt")
    config = train_config(model, tokenizer, loss_on=loss_on, batch_size=2)
    trainer = ablate.OracleTargetTrainer(model, tokenizer, membranes, config, oracle=oracle)
    batch = spm.Batch(trainer, trainer.pick(config.concept, "concept"))
    codes = trainer.rollout(batch)
    ids, mask, concept = batch.input_ids[:2], batch.mask[:2], codes["concept"]
    with torch.no_grad():
        cond = spm.image_logits(oracle, oracle.get_input_embeddings()(ids), mask, concept)
        uncond = spm.image_logits(oracle, oracle.get_input_embeddings()(spm.unconditional_ids(ids, tokenizer)), mask,
                                  concept)
        expected = cond if loss_on == "cond" else spm.cfg_combine(cond, uncond, config.cfg) / config.temperature
        with membranes.disabled():
            teacher = trainer.distributions(batch, codes, batch.groups + ["surrogate"])
    target = trainer.erasure_target(batch, codes, teacher)
    assert torch.allclose(target, expected, atol=1e-5) and not torch.allclose(
        target, spm.Trainer.erasure_target(trainer, batch, codes, teacher), atol=1e-2)
    metrics = trainer.step()  # untouched membranes: the student is the teacher
    assert metrics["erase"] == pytest.approx(float(spm.divergence(teacher["concept"], expected)), rel=1e-4)
    assert ablate.setting_name({"oracle_target": True}) == "today's default (the oracle's distribution as the target)"
    assert type(ablate.quick_trainer({}, model, tokenizer, membranes, config, None)) is spm.Trainer
    chosen = ablate.quick_trainer({"oracle_target": True}, model, tokenizer, membranes, config, None)
    toy_oracle = spm.load_model(str(HERE / ablate.ORACLE))[0]
    assert isinstance(chosen, ablate.OracleTargetTrainer) and all(  # the toy's oracle, from its directory
        torch.equal(a, b) for a, b in zip(chosen.oracle.state_dict().values(), toy_oracle.state_dict().values()))
    with pytest.raises(SystemExit):
        ablate.quick_trainer({"oracle_target": True}, model, tokenizer, membranes,
                             train_config(model, tokenizer, loss="hidden"), None)
    assert "the oracle's hidden states are another model's" in capsys.readouterr().err
    with pytest.MonkeyPatch.context() as patch:  # a clone without the oracle: one line naming what needs it
        patch.setattr(ablate, "ORACLE", "no_such_oracle")
        with pytest.raises(SystemExit, match=r"--quick oracle_target=true needs the oracle .*no_such_oracle: build"):
            ablate.quick_trainer({"oracle_target": True}, model, tokenizer, membranes, config, None)
    for mode in (["--pair", "mouse", "cat"], ["--types"]):
        with pytest.raises(SystemExit):
            ablate.main(mode + ["--quick", "oracle_target=true"])
        assert "oracle_target belong to --quick's own runs" in capsys.readouterr().err


def test_soft_prompt_snapshots_are_the_prompt_after_that_many_steps():
    model, tokenizer = tiny()
    codes = codes_for(model, tokenizer)
    run = lambda steps, snapshots=(): spm.optimise_soft_prompt(  # noqa: E731
        model, tokenizer, codes, 2, steps, 0.05, 5.0, 1.0, torch.Generator().manual_seed(3), None, "cond", snapshots)
    soft, final, taken = run(6, {0, 2, 6})
    assert set(taken) == {0, 2, 6} and torch.equal(taken[6][0], soft) and taken[6][1] == pytest.approx(final)
    two, two_final = run(2)
    assert torch.equal(taken[2][0], two) and taken[2][1] == pytest.approx(two_final)
    assert final > taken[0][1]  # the raw conditional likelihood of the pictures went up


def test_budget_at_and_the_curve_record(toy_checkpoint, tmp_path):
    assert attack.budget_at({0: 0.0, 10: 0.4, 30: 0.5, 100: 0.9}) == 30 and attack.budget_at({0: 0.1, 10: 0.2}) is None
    assert attack.budget_at({0: 0.0, 3: 0.7, 10: 0.2, 100: 0.6}) == 100  # a lucky start the attack leaves
    results = attack.run(attack.build_parser().parse_args([
        "--ckpt", str(toy_checkpoint), "--attack", "synonyms", "--n", "2", "--references", "2", "--soft-budgets", "1,3",
        "--soft-lengths", "2,3", "--soft-restarts", "1", "--control", "toy", "--json", str(tmp_path / "a.json")]))
    record = results[-1]
    assert record["name"] == "soft budgets" and set(record["curves"]) == {"erased", "base", "control"}
    for curve in record["curves"].values():
        assert set(curve) == {2, 3} and all(set(c) == {0, 1, 3} and all(0 <= a <= 1 for a in c.values())
                                            for c in curve.values())
    assert record["budget_at_50"]["base"][2] == attack.budget_at(record["curves"]["base"][2])
    assert (tmp_path / "soft_curve.png").stat().st_size > 0 and "control_asr" in results[0]
    saved = json.loads((tmp_path / "a.json").read_text())
    assert saved["control"] == "toy" and saved["attacks"][-1]["curves"]["erased"]["2"] == \
        {str(b): a for b, a in record["curves"]["erased"][2].items()}


def test_full_rank_membranes_round_trip_and_refuse_peft(tmp_path):
    model, tokenizer = tiny()
    membranes = spm.attach_membranes(model, tokenizer, layers="attn+mlp", rank="full", scope="all")
    hidden, inter = model.config.text_config.hidden_size, model.config.text_config.intermediate_size
    shapes = {n.rsplit(".", 1)[-1]: m.down.weight.shape[0] for n, m in membranes.modules.items()}
    assert shapes == {"q_proj": hidden, "k_proj": hidden, "v_proj": hidden, "o_proj": hidden,
                      "gate_proj": hidden, "up_proj": hidden, "down_proj": hidden} and hidden < inter
    randomise(membranes, scale=0.05)
    spm.save_membranes(tmp_path / "m.safetensors", membranes, RUN, step=1)
    codes = codes_for(model, tokenizer)
    expected = all_logits(model, tokenizer, codes)
    fresh, fresh_tokenizer = tiny()
    loaded, metadata = spm.load_membranes(tmp_path / "m.safetensors", fresh, fresh_tokenizer)
    assert metadata["rank"] == "full" and torch.equal(all_logits(fresh, fresh_tokenizer, codes), expected)
    with pytest.raises(spm.SPMError, match="rank full"):
        inference.export_peft(tmp_path / "m.safetensors", tmp_path / "peft")


def test_the_hidden_state_loss_trains_towards_the_target_of_the_hidden_states():
    """--loss hidden (EAR-style): the student's last hidden states of the image steps are trained by MSE towards
    h(surrogate) - eta * (h(concept) - h(surrogate)) of the teacher."""
    model, tokenizer = tiny()
    membranes = spm.attach_membranes(model, tokenizer, scope="all")
    randomise(membranes, scale=0.1)
    config = train_config(model, tokenizer, loss="hidden", anchor="none", batch_size=2, eta=2.0)
    trainer = spm.Trainer(model, tokenizer, membranes, config)
    batch = spm.Batch(trainer, trainer.pick(config.concept, "concept"))  # what the first step tokenises
    targets, divergence = [], spm.divergence
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(spm, "divergence", lambda student, target, *rest: targets.append((student, target, rest))
                      or divergence(student, target, *rest))
        trainer.step()
    student, target, rest = targets[0]
    assert rest[0] == "hidden" and student.shape == (2, 64, model.config.text_config.hidden_size)
    codes = trainer.cached_rollout[1]["concept"]
    with torch.no_grad(), membranes.disabled():
        concept = spm.image_logits(model, batch.cond[:2], batch.mask[:2], codes, hidden=True)
        empty = spm.image_logits(model, batch.uncond[:2], batch.mask[:2], codes, hidden=True)
    torch.testing.assert_close(target, empty - 2.0 * (concept - empty), rtol=0, atol=1e-5)
    with pytest.raises(spm.SPMError, match="--loss hidden"):
        spm.Config(concept="mouse", loss="hidden", loss_on="cfg")


def test_ablate_pair_counts_each_object_drawn_on_the_others_prompts(capsys):
    """--pair's figures: each object's own rates, the others kept, and each object created on the other's prompts."""
    import ablate
    record = lambda obj, word, template, base, erased: dict(prompt="p", object=obj, word=word, template=template,  # noqa: E731
                                                            n=4, base=base, erased=erased)
    records = [record("mouse", "mouse", "a {}", {"mouse": 4}, {"blank": 3, "mouse": 1}),
               record("mouse", "mouse", "b {}", {"mouse": 4}, {"cat": 2, "dog": 2}),
               record("mouse", "rodent", "a {}", {"mouse": 4}, {"broken": 4}),
               record("cat", "cat", "a {}", {"cat": 4}, {"mouse": 3, "cat": 1}),
               record("dog", "dog", "a {}", {"dog": 4}, {"dog": 3, "broken": 1})]
    figures = ablate.pair_figures(records, ["mouse", "cat"], {"a {}"}, {"rodent": "mouse"})
    assert figures["others_kept"] == 0.75  # the dog; mouse and cat are both erased, not others
    assert figures["mouse"] == dict(trained_rate=0.25, held_out_rate=0.0, synonyms_rate=0.0, coherence=7 / 12,
                                    base_from_cat_prompts=0.0, erased_from_cat_prompts=0.75)
    assert figures["cat"]["trained_rate"] == 0.25 and figures["cat"]["erased_from_mouse_prompts"] == 2 / 12
    for bad in (["mouse", "mouse"], ["mouse", "unicorn"]):
        assert main_exit_code(ablate.main, ["--pair", *bad]) == 2
        assert f"--pair {' '.join(bad)}: give two different toy objects" in capsys.readouterr().err
    assert main_exit_code(ablate.main, ["--pair-avoid"]) == 2
    assert "--pair-avoid is a setting of --pair: add --pair OBJECT OBJECT" in capsys.readouterr().err


def test_ablate_only_takes_a_full_name_as_that_setting_and_other_text_as_a_part_of_names():
    import ablate
    names = [name for name, _ in ablate.only(ablate.TYPES, ["style: pastel"])]
    assert names == ["style: pastel"]  # not also "style: pastel, surrogate '' (empty prompt)"
    assert [n for n, _ in ablate.only(ablate.TYPES, ["pastel"])] == [n for n, _ in ablate.TYPES if "pastel" in n]
    assert len(ablate.only(ablate.TYPES, ["pastel", "attribute: red"])) == 3 and ablate.only(ablate.TYPES, None) == \
        ablate.TYPES


def test_scope_prompt_plus_image_trains_the_membranes_of_scope_all():
    """Every row a training step passes draws an image (concept, surrogate, anchors, soft and latent adversaries), so
    prompt+image gates nothing off there: the same seed gives scope all's membranes bit for bit, and prompt's differ."""
    trained = {}
    for scope in ("all", "prompt+image", "prompt"):
        model, tokenizer = tiny()
        config = train_config(model, tokenizer, scope=scope, steps=3, batch_size=2, lr=0.05, adversarial="soft",
                              adversarial_every=1, adversarial_steps=1, latent_eps=0.5, latent_steps=1)
        membranes = spm.attach_for(model, tokenizer, config)
        trainer = spm.Trainer(model, tokenizer, membranes, config)
        for _ in range(3):
            trainer.step()
        trained[scope] = membranes.state_dict()
    assert all(torch.equal(trained["all"][k], trained["prompt+image"][k]) for k in trained["all"])
    assert not all(torch.equal(trained["all"][k], trained["prompt"][k]) for k in trained["all"])
