"""The MLLM's forward pass: input fusion, image slots, the objective, gradients, any causal LM."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from dualtoken.errors import CheckpointError, ConfigError, DataError
from dualtoken.mllm import FusionConfig, LLMConfig


def test_forward_backward_reaches_every_trainable_part(make_mllm, tiny_codes, mixed_batch):
    model = make_mllm().train()
    batch = mixed_batch(model, tiny_codes)
    losses = model(batch)
    assert torch.isfinite(losses.loss) and losses.text > 0 and losses.pixel > 0 and losses.semantic > 0
    assert losses.pixel_per_depth.shape == (4,) and losses.semantic_per_depth.shape == (4,)
    losses.loss.backward()
    for name, param in model.named_parameters():
        if name.startswith(("fusion.", "pixel_head.", "semantic_head.", "llm.")):
            assert param.grad is not None and torch.isfinite(param.grad).all(), name
            assert param.grad.abs().sum() > 0, name
    # the code tables (frozen by default) and the DualToken tokenizer never train
    assert not any(p.requires_grad for p in model.code_tables.parameters())
    assert not any(p.requires_grad for p in model.visual_tokenizer.parameters())


def test_code_tables_start_as_the_tokenizer_code_embeddings(make_mllm, tiny_tokenizer, tiny_codes):
    model = make_mllm()
    for branch in ("pixel", "semantic"):
        codes = getattr(tiny_codes, branch)
        ours = model.code_tables.sums(codes, branch)
        theirs = tiny_tokenizer.code_embeddings(codes, branch, per_depth=False)
        torch.testing.assert_close(ours, theirs)


def test_each_image_takes_h_times_w_slots_between_markers(make_mllm, tiny_tokenizer):
    model = make_mllm()
    tokens = 8 * 8
    sample = model.prompt.conversation([("user", "<image>\nWhat?<image>"), ("assistant", "A cat.")], 2)
    ids = torch.tensor(sample.input_ids)
    assert int((ids == model.prompt.slot_id).sum()) == 2 * tokens
    for start, end in sample.spans:
        assert end - start == tokens + 2
        assert ids[start] == model.prompt.image_start_id and ids[end - 1] == model.prompt.image_end_id
    gen = model.prompt.generation("Draw a dog.")
    (start, end), ids = gen.spans[0], torch.tensor(gen.input_ids)
    assert ids[start] == model.prompt.image_gen_start_id and ids[end - 1] == model.prompt.image_gen_end_id
    # text loss: only the assistant's words in understanding, the end marker + suffix in generation
    assert model.text_tokenizer.decode([t for t in sample.labels if t >= 0]) == "A cat.<|im_end|>\n"
    assert gen.labels[end - 1] == model.prompt.image_gen_end_id and all(t < 0 for t in gen.labels[: end - 1])


def test_slot_count_mismatch_is_a_data_error(make_mllm, tiny_codes, mixed_batch):
    model = make_mllm()
    batch = mixed_batch(model, tiny_codes)
    batch.pixel_codes, batch.semantic_codes = batch.pixel_codes[:1], batch.semantic_codes[:1]
    with pytest.raises(DataError, match="image slots"):
        model(batch)


@pytest.mark.parametrize(
    "fusion",
    [
        FusionConfig(order="per_branch"),
        FusionConfig(order="concat_first"),
        FusionConfig(inputs="pixel"),
        FusionConfig(inputs="semantic", hidden_width=48),
    ],
)
def test_fusion_modes_use_exactly_their_vocabularies(make_mllm, tiny_codes, fusion):
    model = make_mllm(fusion=fusion)
    pixel, semantic = tiny_codes.pixel, tiny_codes.semantic
    vectors = model.visual_inputs(pixel, semantic)
    assert vectors.shape == (2, 64, 64)
    pixel_moves = not torch.allclose(model.visual_inputs((pixel + 1) % 256, semantic), vectors)
    semantic_moves = not torch.allclose(model.visual_inputs(pixel, (semantic + 1) % 256), vectors)
    assert pixel_moves == (fusion.inputs in ("both", "pixel"))
    assert semantic_moves == (fusion.inputs in ("both", "semantic"))


def test_per_branch_concatenates_two_halves(make_mllm, tiny_codes):
    model = make_mllm()
    reference = model.visual_inputs(tiny_codes.pixel, tiny_codes.semantic)
    vectors = model.visual_inputs(tiny_codes.pixel, (tiny_codes.semantic + 1) % 256)
    torch.testing.assert_close(vectors[..., :32], reference[..., :32])  # the pixel half is untouched
    assert not torch.allclose(vectors[..., 32:], reference[..., 32:])


def test_any_causal_lm_qwen2(make_mllm, mllm_config, tiny_codes, mixed_batch, llm_architecture):
    llm = LLMConfig(
        architecture=llm_architecture(300, "qwen2"), text_tokenizer=mllm_config.llm.text_tokenizer
    )
    model = make_mllm(llm=llm)
    assert type(model.llm).__name__ == "Qwen2ForCausalLM"
    losses = model(mixed_batch(model, tiny_codes))
    losses.loss.backward()
    assert torch.isfinite(losses.loss)


def test_both_losses_fall_on_a_tiny_overfit_set(make_mllm, tiny_codes, mixed_batch):
    model = make_mllm().train()
    batch = mixed_batch(model, tiny_codes)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    first = None
    for _ in range(25):
        losses = model(batch)
        first = first or losses.scalars()
        optimizer.zero_grad()
        losses.loss.backward()
        optimizer.step()
    last = model(batch).scalars()
    assert last["text"] < 0.3 * first["text"]  # understanding: the answer
    assert last["pixel"] < 0.6 * first["pixel"] and last["semantic"] < 0.6 * first["semantic"]  # generation


def test_llm_from_a_local_folder_with_its_tokenizer(make_mllm, mllm_config, tmp_path, tiny_tokenizer, tiny_codes):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from dualtoken.mllm import DualTokenMLLM

    architecture = dict(mllm_config.llm.architecture)
    llm = AutoModelForCausalLM.from_config(AutoConfig.for_model(architecture.pop("model_type"), **architecture))
    llm.save_pretrained(tmp_path / "my-llm")
    AutoTokenizer.from_pretrained(mllm_config.llm.text_tokenizer).save_pretrained(tmp_path / "my-llm")
    config = dataclasses.replace(mllm_config, llm=LLMConfig(path="my-llm"))
    model = DualTokenMLLM.from_config(config, base_dir=tmp_path, visual_tokenizer=tiny_tokenizer)
    for name, value in llm.state_dict().items():
        assert model.llm.state_dict()[name].equal(value), name
    with pytest.raises(CheckpointError, match="no transformers model"):
        DualTokenMLLM.from_config(dataclasses.replace(config, llm=LLMConfig(path="missing")), base_dir=tmp_path,
                                  visual_tokenizer=tiny_tokenizer)


def test_sampling_logits_of_the_last_depth_equal_teacher_forcing(make_mllm, tiny_codes):
    model = make_mllm().eval()
    head = model.pixel_head
    states = torch.randn(5, 64)
    vectors = model.code_tables.vectors(tiny_codes.pixel[0, 0, :5], "pixel")  # (5, Q, D)
    full = head(states, vectors[:, :-1])  # (5, Q, K)
    for depth in range(4):
        torch.testing.assert_close(head(states, vectors[:, :depth], last_only=True), full[:, depth])


@pytest.mark.parametrize("chunk_rows", [1, 7, 256])
def test_the_chunked_cross_entropy_equals_the_plain_one_in_value_and_gradient(chunk_rows):
    from dualtoken.mllm.depth_head import linear_cross_entropy

    torch.manual_seed(0)
    leaves = [torch.randn(30, 12), torch.randn(50, 12), torch.randn(50)]
    targets = torch.randint(0, 50, (30,))
    results = []
    for fused in (True, False):
        x, table, bias = (t.clone().requires_grad_() for t in leaves)
        if fused:
            loss = linear_cross_entropy(x, table, bias, targets, chunk_rows=chunk_rows)
        else:
            loss = F.cross_entropy(x @ table.T + bias, targets, reduction="sum")
        (0.3 * loss).backward()
        results.append((loss.detach(), x.grad, table.grad, bias.grad))
    for fused, plain in zip(*results, strict=True):
        torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    frozen = linear_cross_entropy(leaves[0].clone().requires_grad_(), leaves[1], leaves[2], targets)
    frozen.backward()  # a frozen table (and bias) gets no gradient and costs none
    assert leaves[1].grad is None and leaves[2].grad is None


def test_the_chunked_cross_entropy_runs_in_float32_under_bf16_autocast():
    """A code_table head under bf16 autocast (precision auto on a CPU with bf16 units) hands it bf16 features and a
    float32 table; the loss is float32 and every input gets a gradient of its own dtype."""
    from dualtoken.mllm.depth_head import linear_cross_entropy

    torch.manual_seed(0)
    x = torch.randn(30, 12).bfloat16().requires_grad_()
    table, bias = torch.randn(50, 12).requires_grad_(), torch.zeros(50, requires_grad=True)
    targets = torch.randint(0, 50, (30,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(x, table, bias, targets, chunk_rows=7)
    loss.backward()
    assert loss.dtype == torch.float32 and x.grad.dtype == torch.bfloat16 and table.grad.dtype == torch.float32
    plain = F.cross_entropy(x.float() @ table.T + bias, targets, reduction="sum")
    torch.testing.assert_close(loss, plain)


@pytest.mark.parametrize("classifier", ["per_depth", "code_table"])
@pytest.mark.parametrize("sharing", ["shared", "per_depth"])
def test_the_heads_training_losses_are_the_cross_entropy_of_their_logits(mllm_config, tiny_images, classifier, sharing):
    from dualtoken import DualTokenizer
    from dualtoken.config import apply_overrides
    from dualtoken.mllm import DualTokenMLLM
    from dualtoken.registry import get_config

    torch.manual_seed(0)
    overrides = [f"{b}_quantizer.codebook_sharing={sharing}" for b in ("pixel", "semantic")]
    tokenizer = DualTokenizer.from_config(apply_overrides(get_config("dualtoken-tiny"), overrides)).eval()
    codes = tokenizer.encode(tiny_images).semantic.flatten(0, 2)[:40]  # (M, Q)
    heads = dataclasses.replace(mllm_config.heads, classifier=classifier, dropout=0.0)
    model = DualTokenMLLM.from_config(dataclasses.replace(mllm_config, heads=heads), visual_tokenizer=tokenizer)
    head, table = model.semantic_head, model.code_tables.codebook("semantic")
    states, vectors = torch.randn(40, 64), model.code_tables.vectors(codes[:, :-1], "semantic")
    logits = head(states, vectors, codebook=table)  # (M, Q, K)
    expected = F.cross_entropy(logits.flatten(0, 1), codes.flatten(), reduction="none").view_as(codes).sum(0)
    torch.testing.assert_close(head.losses(states, codes, vectors, table), expected, rtol=1e-5, atol=1e-4)


def test_a_code_table_classifier_scores_the_code_vectors_and_costs_no_weights_per_code(
    make_mllm, mllm_config, tiny_codes, mixed_batch
):
    heads = dataclasses.replace(mllm_config.heads, classifier="code_table")
    tied, full = make_mllm(heads=heads), make_mllm()
    head, table = tied.semantic_head, tied.code_tables.codebook("semantic")  # (K, D)
    assert head.classifier_weight.shape == (4, table.shape[1], 32)  # depth x code_dim x width: no K rows
    size = sum(p.numel() for p in head.parameters())
    assert size < sum(p.numel() for p in full.semantic_head.parameters()) - 4 * 200 * 32
    states, vectors = torch.randn(3, 64), tied.code_tables.vectors(tiny_codes.semantic[0, 0, :3], "semantic")
    logits = head.eval()(states, vectors[:, :-1], codebook=table)  # (3, Q, K)
    x = torch.cat([head.gen_projector(states).unsqueeze(1), head.code_in(vectors[:, :-1].cumsum(1))], 1)
    x = x + head.depth_embedding
    for block in head.blocks:
        x = block(x)
    x = head.norm(x)
    expected = torch.einsum("mdw,dcw->mdc", x, head.classifier_weight) @ table.T + head.classifier_bias
    torch.testing.assert_close(logits, expected)
    for depth in range(4):  # sampling's last-depth logits are teacher forcing's
        torch.testing.assert_close(head(states, vectors[:, :depth], last_only=True, codebook=table), logits[:, depth])
    with pytest.raises(ConfigError, match="codebook"):
        head(states, vectors[:, :-1])
    # it learns: both visual losses fall on the tiny overfit set
    model = tied.train()
    batch = mixed_batch(model, tiny_codes)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    first = model(batch).scalars()
    for _ in range(25):
        optimizer.zero_grad()
        model(batch).loss.backward()
        optimizer.step()
    last = model(batch).scalars()
    assert last["pixel"] < 0.6 * first["pixel"] and last["semantic"] < 0.6 * first["semantic"]


@pytest.mark.parametrize("classifier", ["per_depth", "code_table"])
def test_a_tokenizer_with_one_codebook_per_depth_reads_trains_and_generates(
    mllm_config, tiny_images, mixed_batch, classifier
):
    from dualtoken import DualTokenizer
    from dualtoken.config import apply_overrides
    from dualtoken.mllm import DualTokenMLLM
    from dualtoken.mllm.generation import generate_images
    from dualtoken.registry import get_config

    torch.manual_seed(0)
    sharing = [f"{b}_quantizer.codebook_sharing=per_depth" for b in ("pixel", "semantic")]
    tokenizer = DualTokenizer.from_config(apply_overrides(get_config("dualtoken-tiny"), sharing)).eval()
    codes = tokenizer.encode(tiny_images)
    heads = dataclasses.replace(mllm_config.heads, classifier=classifier)
    model = DualTokenMLLM.from_config(dataclasses.replace(mllm_config, heads=heads), visual_tokenizer=tokenizer)
    for branch in ("pixel", "semantic"):  # depth d reads its own codebook: E_d[c_d], not E_0[c_d]
        assert model.code_tables.codebook(branch).shape == tokenizer.codebook(branch).shape == (4, 256, 8)
        torch.testing.assert_close(
            model.code_tables.sums(getattr(codes, branch), branch),
            tokenizer.code_embeddings(getattr(codes, branch), branch, per_depth=False),
        )
    head, table = model.pixel_head.eval(), model.code_tables.codebook("pixel")
    states, vectors = torch.randn(3, 64), model.code_tables.vectors(codes.pixel[0, 0, :3], "pixel")
    logits = head(states, vectors[:, :-1], codebook=table)  # (3, Q, K)
    for depth in range(4):  # sampling's last-depth logits are teacher forcing's, depth by depth
        torch.testing.assert_close(head(states, vectors[:, :depth], last_only=True, codebook=table), logits[:, depth])
    losses = model.train()(mixed_batch(model, codes))
    losses.loss.backward()
    assert torch.isfinite(losses.loss) and all(p.grad is not None for p in model.pixel_head.parameters())
    images = generate_images(model, ["Draw a dog."], cfg_scale=2.0, seed=1)
    assert images.pixel_codes.shape == (1, 8, 8, 4) and int(images.pixel_codes.max()) < 256


def test_the_mllm_trains_saves_and_draws_on_a_tokenizer_pair(mllm_config, tiny_images, mixed_batch, tmp_path):
    """A naive pair (pixel vocabulary of one model, semantic of another, different depths and sizes) in the MLLM."""
    from dualtoken import DualTokenizer, TokenizerPair
    from dualtoken.config import apply_overrides
    from dualtoken.registry import get_config

    members = []
    for seed, depth, codes in ((0, 3, 64), (1, 5, 128)):
        torch.manual_seed(seed)
        overrides = ["pixel_quantizer=null", "shortcut_layer=null", f"semantic_quantizer.depth={depth}", f"semantic_quantizer.codebook_size={codes}"]
        members.append(DualTokenizer.from_config(apply_overrides(get_config("dualtoken-tiny"), overrides)).eval())
    from dualtoken.mllm import DualTokenMLLM
    from dualtoken.mllm.generation import generate_images

    pair = TokenizerPair(*members)
    model = DualTokenMLLM.from_config(mllm_config, visual_tokenizer=pair)
    assert model.pixel_head.depth == 3 and model.semantic_head.depth == 5
    codes = pair.encode(tiny_images)
    losses = model.train()(mixed_batch(model, codes))
    losses.loss.backward()
    assert torch.isfinite(losses.loss) and losses.pixel_per_depth.shape == (3,)
    model.save_pretrained(tmp_path / "mllm")
    loaded = DualTokenMLLM.from_pretrained(tmp_path / "mllm")
    assert isinstance(loaded.visual_tokenizer, TokenizerPair)
    drawn = generate_images(loaded, ["Draw a dog."], cfg_scale=2.0, seed=1)
    assert drawn.pixel_codes.shape == (1, 8, 8, 3) and drawn.semantic_codes.shape == (1, 8, 8, 5)
    assert drawn.images.shape == (1, 3, 64, 64)


def _train_save_load_and_draw(model, codes, mixed_batch, folder):
    """One training step, a save / load round trip and a drawing, each of the depths the model predicts; the loaded
    model and its drawing."""
    from dualtoken.mllm import DualTokenMLLM
    from dualtoken.mllm.generation import generate_images

    predicted = model.predict_depths
    losses = model.train()(mixed_batch(model, codes))
    assert losses.pixel_per_depth.shape == (predicted["pixel"],)
    assert losses.semantic_per_depth.shape == (predicted["semantic"],)
    losses.loss.backward()
    assert all(p.grad is not None for p in (*model.semantic_head.parameters(), *model.fusion.parameters()))
    model.save_pretrained(folder)
    loaded = DualTokenMLLM.from_pretrained(folder)
    assert loaded.depths == model.depths and loaded.predict_depths == predicted
    drawn = generate_images(loaded, ["Draw a dog."], cfg_scale=2.0, seed=1)
    assert drawn.pixel_codes.shape == (1, 8, 8, predicted["pixel"])
    assert drawn.semantic_codes.shape == (1, 8, 8, predicted["semantic"])
    torch.testing.assert_close(drawn.images, loaded.visual_tokenizer.decode(drawn.pixel_codes))
    return loaded, drawn


def test_a_prefix_of_depths_is_read_trained_generated_saved_and_loaded(make_mllm, tiny_codes, mixed_batch, tmp_path):
    model = make_mllm(pixel_depths=2, semantic_depths=1)
    assert model.depths == {"pixel": 2, "semantic": 1}
    assert model.pixel_head.depth == 2 and model.semantic_head.depth == 1
    # full-depth codes are read as their prefix: later depths change nothing, earlier ones do
    pixel, semantic = tiny_codes.pixel, tiny_codes.semantic
    vectors = model.visual_inputs(pixel, semantic)
    later = pixel.clone()
    later[..., 2:] = (later[..., 2:] + 1) % 256
    torch.testing.assert_close(model.visual_inputs(later, semantic), vectors)
    torch.testing.assert_close(model.visual_inputs(pixel[..., :2], semantic[..., :1]), vectors)
    assert not torch.allclose(model.visual_inputs((pixel + 1) % 256, semantic), vectors)
    with pytest.raises(DataError, match="reads the first 2"):
        model.visual_inputs(pixel[..., :1], semantic)
    assert model.predict_depths == model.depths  # it draws what it reads
    _train_save_load_and_draw(model, tiny_codes, mixed_batch, tmp_path / "mllm")


def test_it_can_read_every_depth_and_draw_a_prefix(make_mllm, tiny_codes, mixed_batch, tmp_path):
    from dualtoken.mllm.generation import generate_images

    model = make_mllm(predict_pixel_depths=2, predict_semantic_depths=1)
    assert model.depths == {"pixel": 4, "semantic": 4} and model.predict_depths == {"pixel": 2, "semantic": 1}
    assert model.pixel_head.depth == 2 and model.semantic_head.depth == 1
    pixel, semantic = tiny_codes.pixel, tiny_codes.semantic  # (2, 8, 8, 4) each
    later = pixel.clone()
    later[..., 2:] = (later[..., 2:] + 1) % 256
    drawn = torch.tensor([False, True])
    read, moved = model.visual_inputs(pixel, semantic, drawn), model.visual_inputs(later, semantic, drawn)
    assert not torch.allclose(read[0], moved[0])  # an image it answers about: every depth counts
    torch.testing.assert_close(read[1], moved[1])  # a drawing: only the depths it predicts
    # a drawing is read as generation feeds its codes back, one position at a time
    fed_back = model.fuse(pixel[1:, ..., :2].flatten(1, 2), semantic[1:, ..., :1].flatten(1, 2))
    torch.testing.assert_close(read[1:], fed_back)
    torch.testing.assert_close(model.visual_inputs(pixel, semantic)[0], read[0])
    loaded, drawn = _train_save_load_and_draw(model, tiny_codes, mixed_batch, tmp_path / "mllm")
    assert loaded.depths == {"pixel": 4, "semantic": 4}
    uncached = generate_images(loaded, ["Draw a dog."], cfg_scale=2.0, seed=1, use_cache=False)
    assert torch.equal(drawn.pixel_codes, uncached.pixel_codes) and torch.equal(drawn.semantic_codes, uncached.semantic_codes)


def test_it_cannot_draw_more_depths_than_it_reads(make_mllm):
    with pytest.raises(ConfigError, match="predict_pixel_depths is 3, more than the 2 pixel depths"):
        make_mllm(pixel_depths=2, predict_pixel_depths=3)
    with pytest.raises(ConfigError, match="predict_semantic_depths is 5, more than the 4 semantic depths"):
        make_mllm(predict_semantic_depths=5)


def test_a_prefix_longer_than_the_vocabulary_is_a_config_error(make_mllm):
    with pytest.raises(ConfigError, match="semantic_depths is 5, but the tokenizer's semantic vocabulary has 4"):
        make_mllm(semantic_depths=5)
