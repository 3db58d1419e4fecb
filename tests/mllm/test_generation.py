"""Inference: sampling rules, seeded determinism, KV cache = no cache, guidance, decoding, answers."""

from __future__ import annotations

import torch

from dualtoken.mllm import generate_images
from dualtoken.mllm.generation import answer
from dualtoken.mllm.sampling import filter_logits, guide, sample


def test_filter_logits_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, 2, 1.0)).tolist() == [[False, False, True, True]]
    # the smallest set reaching 0.8 is {0.5, 0.3}; reaching 0.81 needs the third
    assert torch.isinf(filter_logits(logits, 0, 0.8)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, 0, 0.81)).tolist() == [[False, False, False, True]]
    assert torch.isinf(filter_logits(logits, 0, 0.01)).tolist() == [[False, True, True, True]]


def test_sample_rules():
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 0.0]])
    assert sample(logits, 0.0, 0, 1.0, None).tolist() == [1, 0]
    draws = torch.stack([sample(logits, 1.0, 1, 1.0, torch.Generator().manual_seed(s)) for s in range(20)])
    assert (draws == torch.tensor([1, 0])).all()  # top-1 sampling is the argmax
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert sample(logits.repeat(50, 1), 1.0, 0, 1.0, g1).equal(sample(logits.repeat(50, 1), 1.0, 0, 1.0, g2))
    cond, uncond = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    assert guide(cond, uncond, 1.0).equal(cond)
    assert guide(cond, uncond, 3.0).tolist() == [4.0, -2.0]


def test_sampling_draws_each_token_at_its_probability_and_never_a_filtered_one():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().repeat(40_000, 1)
    draws = sample(logits, 1.0, 0, 1.0, torch.Generator().manual_seed(0))
    frequencies = torch.bincount(draws, minlength=4) / len(draws)
    torch.testing.assert_close(frequencies, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.01, rtol=0)
    nucleus = sample(logits, 1.0, 0, 0.8, torch.Generator().manual_seed(0))  # {0.5, 0.3}, renormalised
    assert set(nucleus.tolist()) == {0, 1}
    assert abs(float((nucleus == 0).float().mean()) - 0.5 / 0.8) < 0.01


def test_generation_is_deterministic_for_a_seed(make_mllm):
    model = make_mllm()
    first = generate_images(model, ["Draw a cat.", "Draw a dog."], cfg_scale=3.0, seed=7)
    again = generate_images(model, ["Draw a cat.", "Draw a dog."], cfg_scale=3.0, seed=7)
    other = generate_images(model, ["Draw a cat.", "Draw a dog."], cfg_scale=3.0, seed=8)
    assert first.pixel_codes.shape == (2, 8, 8, 4) and first.semantic_codes.shape == (2, 8, 8, 4)
    assert first.pixel_codes.equal(again.pixel_codes) and first.semantic_codes.equal(again.semantic_codes)
    assert first.images.equal(again.images)
    assert not first.pixel_codes.equal(other.pixel_codes)


def test_kv_cached_generation_equals_uncached(make_mllm):
    model = make_mllm()
    for scale in (1.0, 3.0):
        cached = generate_images(
            model, ["Draw a cat.", "Draw a ship."], cfg_scale=scale, seed=1, decode=False
        )
        plain = generate_images(
            model, ["Draw a cat.", "Draw a ship."], cfg_scale=scale, seed=1, decode=False, use_cache=False
        )
        assert cached.pixel_codes.equal(plain.pixel_codes)
        assert cached.semantic_codes.equal(plain.semantic_codes)


def test_guidance_changes_the_images_and_pixel_codes_decode_with_the_tokenizer(make_mllm, tiny_tokenizer):
    model = make_mllm()
    guided = generate_images(model, ["Draw a cat."], cfg_scale=3.0, seed=2)
    plain = generate_images(model, ["Draw a cat."], cfg_scale=1.0, seed=2)
    assert not guided.pixel_codes.equal(plain.pixel_codes)
    torch.testing.assert_close(guided.images, tiny_tokenizer.decode(guided.pixel_codes))
    # the serving protocol: one image (1, 3, H, W) per prompt, deterministic for a seed
    assert model.generate("Draw a cat.", 3.0, 2).equal(guided.images)


def test_answers_cached_equal_uncached_and_stop_at_the_end_of_turn(make_mllm, tiny_codes, mixed_batch):
    model = make_mllm().train()
    batch = mixed_batch(model, tiny_codes)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    for _ in range(30):
        optimizer.zero_grad()
        model(batch).loss.backward()
        optimizer.step()
    codes = (tiny_codes.pixel[:1], tiny_codes.semantic[:1])
    cached = answer(model, ["What is in this image?"], codes)
    plain = answer(model, ["What is in this image?"], codes, use_cache=False)
    assert cached == plain == ["It is a cat."]
    sampled = answer(
        model,
        ["What is in this image?"] * 3,
        (codes[0].repeat(3, 1, 1, 1), codes[1].repeat(3, 1, 1, 1)),
        temperature=1.0,
        seed=5,
    )
    assert sampled == answer(
        model,
        ["What is in this image?"] * 3,
        (codes[0].repeat(3, 1, 1, 1), codes[1].repeat(3, 1, 1, 1)),
        temperature=1.0,
        seed=5,
    )


def test_guidance_above_one_moves_the_sampled_logits_toward_the_condition(make_mllm, monkeypatch):
    """With l_s = l_u + s (l_c - l_u), the expected "condition direction" l_c - l_u under the sampled
    distribution grows with s: the generation path must put the prompt in the conditional half and the blank
    prompt in the unconditional half (swapped halves would move away from the condition)."""
    from dualtoken.mllm import generation

    model = make_mllm()
    seen = []

    def recording(logits, *args):
        seen.append(logits.clone())
        return sample(logits, *args)

    monkeypatch.setattr(generation, "sample", recording)

    def first_logits(prompt, scale):  # the first pixel depth of the first position
        seen.clear()
        generate_images(model, [prompt], cfg_scale=scale, seed=0, decode=False)
        return seen[0][0].float()

    conditional = first_logits("Draw a cat.", 1.0)
    unconditional = first_logits(model.config.prompt.blank_prompt, 1.0)
    direction = conditional - unconditional
    assert direction.abs().max() > 1e-3  # the prompt matters to this random model
    pulls = []
    for scale in (1.0, 2.0, 3.0, 5.0):
        logits = first_logits("Draw a cat.", scale)
        torch.testing.assert_close(logits, unconditional + scale * direction, atol=1e-4, rtol=1e-4)
        pulls.append(float((logits.softmax(-1) * direction).sum()))
    assert float((unconditional.softmax(-1) * direction).sum()) < pulls[0]
    assert all(a < b for a, b in zip(pulls, pulls[1:])), pulls
