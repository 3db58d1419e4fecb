import pytest
import torch

from dualtoken.config import QuantizerConfig, from_dict
from dualtoken.errors import ConfigError
from dualtoken.quantizer import (
    ResidualQuantizer,
    kmeans,
    nearest_codes,
    residual_codes,
    row_minimum,
    split_codes,
)

from .conftest import per_depth_codes


def plain_nearest(vectors, codebook):
    distances = torch.addmm(vectors.pow(2).sum(1, keepdim=True) + codebook.t().pow(2).sum(0, keepdim=True), vectors, codebook.t(), alpha=-2.0)
    return distances.argmin(1)


@pytest.mark.parametrize("block_rows", [1, 7, 64, 1000])
def test_blocked_search_equals_the_full_distance_matrix(block_rows):
    g = torch.Generator().manual_seed(0)
    vectors, codebook = torch.randn(333, 16, generator=g), torch.randn(500, 16, generator=g)
    assert torch.equal(nearest_codes(vectors, codebook, block_rows), plain_nearest(vectors, codebook))


def test_ties_take_the_first_index():
    codebook = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    assert nearest_codes(torch.tensor([[1.0, 0.0]]), codebook).item() == 0


def exact_nearest(vectors, codebook):
    """The exact nearest code in float64, first index on ties: what the search must return."""
    return (vectors.double()[:, None] - codebook.double()[None]).pow(2).sum(2).argmin(1)


def near_tie_codebook(K=512, D=96, seed=0):
    """Codes with exact duplicates, copies one float32 step apart, and copies differing in one coordinate by 1e-6,
    and rows placed halfway between two codes: every row's decision rests on rounding."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(K // 4, D, generator=g)
    nudged = base.clone()
    nudged[:, 0] = torch.nextafter(nudged[:, 0], torch.full_like(nudged[:, 0], 100.0))
    slight = base + 1e-6 * torch.randn(K // 4, D, generator=g)
    codebook = torch.cat([base, base, nudged, slight])[torch.randperm(K, generator=g)]
    halfway = (codebook[:128] + codebook[128:256]) / 2
    vectors = torch.cat([base[:64] + 1e-3 * torch.randn(64, D, generator=g), halfway, torch.randn(64, D, generator=g)])
    return vectors, codebook


@pytest.mark.parametrize("width", [100, 256, 1024])
def test_row_minimum_is_argmin_with_its_runner_up(width):
    g = torch.Generator().manual_seed(width)
    scores = torch.randint(0, 50, (40, width), generator=g).float()  # many ties
    index, value, runner_up = row_minimum(scores, runner_up=True)
    assert torch.equal(index, scores.argmin(1))
    assert torch.equal(value, scores.min(1).values)
    assert torch.equal(runner_up, scores.sort(1).values[:, 1])
    assert torch.equal(row_minimum(scores)[0], scores.argmin(1))


def test_nearest_codes_decides_rounding_ties_exactly():
    vectors, codebook = near_tie_codebook()
    assert torch.equal(nearest_codes(vectors, codebook), exact_nearest(vectors, codebook))
    for block_rows in (1, 5, 256):  # the codes no longer depend on the block (or the BLAS kernel it picks)
        assert torch.equal(nearest_codes(vectors, codebook, block_rows), nearest_codes(vectors, codebook))
    # many near-duplicates of the nearest code: every one of them is measured in float64
    crowded = torch.cat([codebook[:1].repeat(40, 1) + 1e-7 * torch.randn(40, codebook.shape[1]), codebook])
    assert torch.equal(nearest_codes(vectors, crowded), exact_nearest(vectors, crowded))


def test_nearest_codes_agrees_with_the_plain_float32_search_off_ties():
    g = torch.Generator().manual_seed(0)
    vectors, codebook = torch.randn(500, 32, generator=g), torch.randn(2048, 32, generator=g)
    assert torch.equal(nearest_codes(vectors, codebook), plain_nearest(vectors, codebook))


@pytest.mark.parametrize("first_pass", ["gram", "gram_torch_loop", "matmul", "bf16"])
@pytest.mark.parametrize("case", ["random", "near_ties"])
def test_residual_codes_equal_the_per_depth_search(case, first_pass):
    if case == "random":
        g = torch.Generator().manual_seed(1)
        vectors, codebook = torch.randn(300, 96, generator=g) * 3, torch.randn(1024, 96, generator=g)
    else:
        vectors, codebook = near_tie_codebook()
    expected = per_depth_codes(vectors, codebook, 4)
    gram = codebook @ codebook.t() if first_pass.startswith("gram") else None
    low_precision = torch.bfloat16 if first_pass == "bf16" else None
    compiled = first_pass != "gram_torch_loop"  # the Gram pass's depth loop: compiled on a CPU, or PyTorch's
    for block_rows in (64, 256):
        codes = residual_codes(vectors, codebook, 4, block_rows, gram=gram, low_precision=low_precision,
                               compiled=compiled)
        assert torch.equal(codes, expected)
    with pytest.raises(ValueError):
        residual_codes(vectors, codebook, 4, gram=codebook @ codebook.t(), low_precision=torch.bfloat16)


def test_eval_forward_builds_the_gram_matrix_once_it_pays_and_keeps_the_codes():
    q = make(K=256, D=64, Q=4, search_first_pass="gram").eval()
    x = torch.randn(100, 64)
    expected = per_depth_codes(x, q.codebook, 4)
    first = q(x)  # 100 rows x 3 later depths > 256: the Gram matrix is built
    cache = q.__dict__["_gram_cache"]
    assert cache.gram is not None and torch.allclose(cache.gram, q.codebook @ q.codebook.t())
    assert torch.equal(first.codes, expected)
    q.train()(torch.randn(50, 64))  # an EMA update changes the codebook: the Gram matrix is rebuilt
    second = q.eval()(x)
    assert torch.equal(cache.source, q.codebook) and torch.equal(cache.gram, q.codebook @ q.codebook.t())
    assert torch.equal(second.codes, per_depth_codes(x, q.codebook, 4))
    small = make(K=256, D=64, Q=4, search_first_pass="gram", search_gram_max_mib=0).eval()
    small(x)
    assert "_gram_cache" not in small.__dict__


def test_the_matmul_first_pass_holds_no_table_and_keeps_the_codes():
    q = make(K=256, D=64, Q=4, search_first_pass="matmul").eval()
    x = torch.randn(100, 64)
    assert torch.equal(q(x).codes, per_depth_codes(x, q.codebook, 4))
    assert "_gram_cache" not in q.__dict__
    auto = make(K=256, D=64, Q=4).eval()  # auto: the Gram matrix on a CPU, a matmul per depth on an accelerator
    assert auto.first_pass(torch.device("cpu")) == "gram"
    assert auto.first_pass(torch.device("meta")) == "matmul"
    assert make(K=256, D=32, Q=4).first_pass(torch.device("cpu")) is None  # too narrow for the Gram matrix
    with pytest.raises(ConfigError, match="search_first_pass"):
        QuantizerConfig(search_first_pass="faiss")


def test_codes_of_the_parity_fixtures_through_every_search(parity_dir):
    from safetensors.torch import load_file

    weights = load_file(str(parity_dir / "model.safetensors"))
    expected = load_file(str(parity_dir / "expected.safetensors"))
    for prefix, latent, codes in (("pix", "pix_latent", "pixel_codes"), ("sem", "sem_latent", "semantic_codes")):
        codebook = weights[f"quantizer_{prefix}.codebooks.0.weight"][:-1]  # the padding row dropped
        x = expected[latent].reshape(-1, codebook.shape[1])
        reference = expected[codes].reshape(x.shape[0], -1)
        depth = reference.shape[1]
        assert torch.equal(per_depth_codes(x, codebook, depth), reference)
        for compiled in (True, False):
            gram = codebook @ codebook.t()
            assert torch.equal(residual_codes(x, codebook, depth, gram=gram, compiled=compiled), reference)
        assert torch.equal(residual_codes(x, codebook, depth, low_precision=torch.bfloat16), reference)


def test_codes_of_kodak_with_the_shipped_model_through_every_search(shared_data):
    from dualtoken import DualTokenizer
    from dualtoken.io import list_images, load_image

    files = list_images(shared_data / "kodak")[:2]
    tokenizer = DualTokenizer.from_pretrained("dualtoken-efflite0")
    images = torch.stack([load_image(f, tokenizer.image_size) for f in files])
    with torch.no_grad():
        latent = tokenizer._run_to_taps(images).semantic_latent
    quantizer = tokenizer.quantizer("semantic")
    x, codebook, depth = latent.reshape(-1, quantizer.config.code_dim), quantizer.codebook, quantizer.depth
    expected = per_depth_codes(x, codebook, depth)
    plain = per_depth_codes(x, codebook, depth, search=plain_nearest)
    assert (plain != expected).float().mean() < 1e-3  # the old search differs only at rounding-level ties
    gram = codebook @ codebook.t()
    assert torch.equal(residual_codes(x, codebook, depth, gram=gram), expected)
    assert torch.equal(residual_codes(x, codebook, depth, gram=gram, compiled=False), expected)
    rows = slice(0, 8)  # bf16 matmuls are emulated (slow) on CPUs without bf16 units
    low = residual_codes(x[rows], codebook, depth, low_precision=torch.bfloat16)
    assert torch.equal(low, expected[rows])


def make(schedule="per_depth", K=32, D=4, Q=3, **kw):
    torch.manual_seed(0)
    return ResidualQuantizer(QuantizerConfig(codebook_size=K, code_dim=D, depth=Q, ema_schedule=schedule, **kw))


def test_residual_encoding_and_decoding():
    q = make().eval()
    x = torch.randn(2, 5, 4)
    out = q(x)
    assert out.codes.shape == (2, 5, 3)
    # forward value is the sum of the code vectors; decode reproduces it
    torch.testing.assert_close(out.quantized, q.decode(out.codes), atol=1e-6, rtol=0)
    # each depth reduces the residual on average
    errors = [(x - q.decode(out.codes[..., :k])).pow(2).mean() for k in range(1, 4)]
    assert errors[0] > errors[1] > errors[2]
    partial = [q.decode(out.codes[..., :k]) for k in range(1, 4)]
    expected = torch.stack([(x - a).pow(2).mean() for a in partial]).mean()
    torch.testing.assert_close(out.commitment, expected)


def test_gradient_reaches_the_input_only():
    q = make().train()
    x = torch.randn(4, 4, requires_grad=True)
    out = q(x)
    (out.quantized.sum() + out.commitment).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert list(q.parameters()) == []  # the codebook is a buffer, never optimised


def test_eval_mode_and_update_false_change_nothing():
    q = make().train()
    before = {k: v.clone() for k, v in q.state_dict().items()}
    q(torch.randn(16, 4), update=False)
    q.eval()(torch.randn(16, 4))
    for k, v in q.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_ema_update_follows_the_formula():
    q = make(restart_unused_codes=False, K=8, D=2, Q=1)
    vectors = torch.randn(20, 2)
    codes = torch.randint(0, 8, (20,))
    cs, es = q.cluster_size.clone(), q.embed_sum.clone()
    q._ema_update(vectors, codes)
    counts = torch.bincount(codes, minlength=8).float()
    sums = torch.zeros(8, 2).index_add_(0, codes, vectors)
    cs = 0.99 * cs + 0.01 * counts
    es = 0.99 * es + 0.01 * sums
    total = cs.sum()
    smoothed = total * (cs + 1e-5) / (total + 8 * 1e-5)
    torch.testing.assert_close(q.codebook, es / smoothed[:, None])
    torch.testing.assert_close(q.cluster_size, cs)


def test_dead_codes_are_restarted_from_batch_vectors():
    q = make(K=8, D=2, Q=1)
    vectors = torch.randn(3, 2) * 100  # fewer vectors than codes: tiled with small noise
    q._ema_update(vectors, torch.zeros(3, dtype=torch.long))
    assert torch.all(q.cluster_size >= 1)  # every dead code restarted with size 1
    # restarted rows are batch vectors plus noise below 0.01 / sqrt(D)
    restarted = q.embed_sum[1:]
    distance = torch.cdist(restarted, vectors).min(dim=1).values
    assert torch.all(distance < 0.01)


def test_per_step_uses_every_depth_residual_unless_the_release_quirk_is_on():
    x = torch.randn(6, 4)
    intended, quirk = make("per_step").train(), make("per_step", per_step_final_residual=True).train()
    calls = {}
    for name, q in (("intended", intended), ("quirk", quirk)):
        original = q._ema_update
        q._ema_update = lambda v, c, name=name, original=original: (calls.__setitem__(name, v.clone()), original(v, c))
        q(x)
    codes = make("per_step").eval()(x).codes
    eval_q = make("per_step").eval()
    residuals = [x - eval_q.decode(codes[..., :k]) if k else x for k in range(3)]
    torch.testing.assert_close(calls["intended"], torch.cat(residuals), atol=1e-6, rtol=0)
    final = x - eval_q.decode(codes)
    torch.testing.assert_close(calls["quirk"], final.repeat(3, 1), atol=1e-6, rtol=0)


def test_bf16_autocast_keeps_the_float32_code_choices():
    q = make(K=256, D=8, Q=4).eval()
    x = torch.randn(64, 8)
    reference = q(x).codes
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = q(x)
    assert torch.equal(out.codes, reference)
    assert out.quantized.dtype == torch.float32


def test_kmeans_finds_separated_clusters_and_leaves_none_empty():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[5.0, 0.0], [-5.0, 0.0], [0.0, 5.0], [0.0, -5.0]])
    points = centres.repeat_interleave(50, dim=0) + 0.1 * torch.randn(200, 2, generator=g)
    found, sizes = kmeans(points, 4, iterations=20, generator=torch.Generator().manual_seed(1))
    matched = nearest_codes(centres, found)
    assert sorted(matched.tolist()) == [0, 1, 2, 3]  # one centroid per cluster
    torch.testing.assert_close(found[matched], centres, atol=0.1, rtol=0)
    assert sizes.tolist() == [50.0] * 4
    # more centroids than vectors: drawn with replacement, still K rows
    few, few_sizes = kmeans(points[:3], 8, iterations=3, generator=torch.Generator().manual_seed(1))
    assert few.shape == (8, 2) and few_sizes.sum() == 3


def test_data_init_fills_a_share_per_depth_and_beats_the_random_codebook():
    g = torch.Generator().manual_seed(0)
    data = torch.randn(2000, 4, generator=g) * torch.tensor([3.0, 1.0, 0.5, 0.2])
    random_init = make(K=64, D=4, Q=4).eval()
    before = (data - random_init(data).quantized).pow(2).mean()
    q = make(K=66, D=4, Q=4).eval()
    report = q.init_from_data(data, vectors_per_update=500, iterations=8, generator=torch.Generator().manual_seed(0))
    assert [r["codes"] for r in report] == [18, 16, 16, 16]  # K // Q each, the remainder at depth 0
    residuals = [r["residual_mse"] for r in report]
    assert residuals == sorted(residuals, reverse=True) and residuals[-1] < residuals[0] / 4
    after = (data - q(data).quantized).pow(2).mean()
    assert after < before / 4
    assert after == pytest.approx(residuals[-1], rel=0.5)
    # EMA state: every code starts alive with its expected count per update, and the codebook is unchanged by it
    assert float(q.cluster_size.min()) >= 1.0
    assert q.cluster_size.sum() >= 500
    torch.testing.assert_close(q.embed_sum / q.cluster_size[:, None], q.codebook)


def test_a_training_step_after_the_data_init_restarts_no_used_code():
    data = torch.randn(4000, 4, generator=torch.Generator().manual_seed(0))
    q = make(K=32, D=4, Q=2)
    q.init_from_data(data, vectors_per_update=1000, generator=torch.Generator().manual_seed(0))
    start = q.codebook.clone()
    q.train()(data[:1000])
    moved = (q.codebook - start).norm(dim=1)
    assert float(moved.max()) < 0.5  # EMA steps only; a restarted code would jump to a random vector


def test_data_init_shares_follow_the_weights():
    data = torch.randn(3000, 4, generator=torch.Generator().manual_seed(0))
    q = make(K=64, D=4, Q=4).eval()
    report = q.init_from_data(data, 500, iterations=3, generator=torch.Generator().manual_seed(0), shares=[4, 2, 1, 1])
    assert [r["codes"] for r in report] == [32, 16, 8, 8]
    assert [r["used"] for r in report] == [32, 16, 8, 8]
    assert len(torch.unique(q(data).codes[..., 0])) > 16  # the first depth reaches past an equal share
    assert split_codes(10, [1, 1, 1]) == [4, 3, 3]
    with pytest.raises(ValueError):
        split_codes(2, [1, 1, 1])


# ------------------------------------------------------------------------------------------------------------------
# codebook sharing and per-depth liveness
# ------------------------------------------------------------------------------------------------------------------


def test_per_depth_codebooks_decode_column_q_from_codebook_q():
    q = make(K=8, D=2, Q=3, codebook_sharing="per_depth").eval()
    assert q.codebook.shape == (3, 8, 2) and q.cluster_size.shape == (3, 8) and q.embed_sum.shape == (3, 8, 2)
    codes = torch.tensor([[5, 1, 7], [0, 0, 0]])
    expected = torch.stack([sum(q.codebook[d, c[d]] for d in range(3)) for c in codes])
    torch.testing.assert_close(q.decode(codes), expected)
    torch.testing.assert_close(q.decode(codes[:, :2]), expected - q.codebook[2, codes[:, 2]])  # a prefix of depths
    out = q(torch.randn(10, 2))
    torch.testing.assert_close(out.quantized, q.decode(out.codes), atol=1e-6, rtol=0)


@pytest.mark.parametrize("schedule", ["per_depth", "per_step"])
def test_per_depth_codebooks_each_follow_their_own_depths_residuals(schedule):
    q = make(schedule, K=8, D=2, Q=2, codebook_sharing="per_depth", restart_unused_codes=False)
    x = torch.randn(40, 2) * 3
    before = {name: buffer.clone() for name, buffer in q.named_buffers()}
    codes = q.eval()(x).codes  # the codes the update sees: depth 1 searches codebook 1, untouched by depth 0's update
    residuals = [x, x - q.decode(codes[:, :1])]
    q.train()(x)
    for depth in range(2):
        counts = torch.bincount(codes[:, depth], minlength=8).float()
        sums = torch.zeros(8, 2).index_add_(0, codes[:, depth], residuals[depth])
        cs = 0.99 * before["cluster_size"][depth] + 0.01 * counts
        es = 0.99 * before["embed_sum"][depth] + 0.01 * sums
        smoothed = cs.sum() * (cs + 1e-5) / (cs.sum() + 8 * 1e-5)
        torch.testing.assert_close(q.cluster_size[depth], cs)
        torch.testing.assert_close(q.codebook[depth], es / smoothed[:, None])


def test_per_depth_codebooks_restart_from_their_own_depths_residuals():
    q = make(K=64, D=2, Q=2, codebook_sharing="per_depth")
    with torch.no_grad():  # depth 0 takes the large vectors with one code; depth 1 sees small residuals
        q.codebook[0] = 1000.0
        q.codebook[0, 0] = torch.tensor([100.0, 0.0])
        q.codebook[1] = 1000.0
        q.codebook[1, 0] = 0.0
    x = torch.tensor([100.0, 0.0]) + 0.1 * torch.randn(32, 2)
    q.train()(x)
    restarted = q.codebook[:, 1:]  # every code but 0 was dead in both codebooks
    assert float(restarted[0].norm(dim=-1).min()) > 90  # depth 0: large inputs
    assert float(restarted[1].norm(dim=-1).max()) < 1  # depth 1: small residuals


def test_depth_liveness_restarts_dead_codes_from_the_neediest_depth():
    q = make(K=16, D=2, Q=2, restart_liveness="per_depth")
    assert q.depth_cluster_size.shape == (2, 16)
    with torch.no_grad():
        q.depth_cluster_size.zero_()
        q.depth_cluster_size[0, :2] = 5.0  # depth 0 lives on 2 codes
        q.depth_cluster_size[1, 2:12] = 5.0  # depth 1 on 10; codes 12..15 are used by neither
        q.cluster_size.fill_(5.0)
    kept = q.embed_sum[:12].clone()
    big, small = 100 + torch.randn(40, 2), 0.01 * torch.randn(40, 2)
    no_codes = torch.zeros(0, dtype=torch.long)
    q._restart_for_the_neediest_depth([big, small], [no_codes, no_codes])
    assert float(q.codebook[12:].norm(dim=1).min()) > 90  # restarted from depth 0's residuals
    torch.testing.assert_close(q.embed_sum[:12], kept)
    assert q.depth_cluster_size[0, 12:].tolist() == [1.0] * 4  # and counted as depth 0's codes
    torch.testing.assert_close(q.depth_cluster_size[1, 2:12], torch.full((10,), 5.0 * 0.99))


def test_depth_liveness_counts_each_depth_and_restarts_once_per_forward():
    q = make(K=32, D=4, Q=3, restart_liveness="per_depth").train()
    calls = []
    original = q._restart
    q._restart = lambda *a: (calls.append(1), original(*a))
    x = torch.randn(50, 4)
    q(x)
    assert calls == [1]  # one restart after the forward (every code starts dead), none inside the EMA updates
    assert torch.all(q.depth_cluster_size.sum(dim=0) >= 1)
    with torch.no_grad():
        q.depth_cluster_size.fill_(3.0)  # every code alive: this forward restarts nothing
    out = q(x)
    counts = torch.stack([torch.bincount(out.codes[:, d], minlength=32) for d in range(3)]).float()  # (Q, K)
    torch.testing.assert_close(q.depth_cluster_size, 0.99 * 3.0 + 0.01 * counts)
    assert calls == [1]


def test_depth_liveness_data_init_counts_each_code_for_its_depth():
    data = torch.randn(3000, 4, generator=torch.Generator().manual_seed(0))
    q = make(K=64, D=4, Q=4, restart_liveness="per_depth")
    q.init_from_data(data, 500, iterations=3, generator=torch.Generator().manual_seed(0), shares=[4, 2, 1, 1])
    owners = (q.depth_cluster_size > 0).float().argmax(dim=0)  # (K,)
    assert owners.tolist() == [0] * 32 + [1] * 16 + [2] * 8 + [3] * 8
    torch.testing.assert_close(q.depth_cluster_size.sum(dim=0), q.cluster_size)
    start = q.codebook.clone()
    q.train()(data[:500])
    assert float((q.codebook - start).norm(dim=1).max()) < 0.5  # no used code restarted by the first step


def test_per_depth_data_init_fills_k_codes_per_depth():
    data = torch.randn(3000, 4, generator=torch.Generator().manual_seed(0)) * torch.tensor([3.0, 1.0, 0.5, 0.2])
    q = make(K=32, D=4, Q=3, codebook_sharing="per_depth").eval()
    report = q.init_from_data(data, 500, iterations=5, generator=torch.Generator().manual_seed(0))
    assert [r["codes"] for r in report] == [32, 32, 32]
    residuals = [r["residual_mse"] for r in report]
    assert residuals == sorted(residuals, reverse=True)
    assert float(q.cluster_size.min()) >= 1.0
    torch.testing.assert_close(q.embed_sum / q.cluster_size[..., None], q.codebook)
    # the codebook of depth q is the k-means of depth q's residuals: its scale shrinks with depth
    scales = [float(q.codebook[d].norm(dim=1).mean()) for d in range(3)]
    assert scales == sorted(scales, reverse=True)
    with pytest.raises(ConfigError, match="shares"):
        q.init_from_data(data, 500, shares=[2, 1, 1])


def test_the_release_default_keeps_its_buffers():
    q = make()
    assert sorted(dict(q.named_buffers())) == ["cluster_size", "codebook", "embed_sum"]
    assert q.codebook.shape == (32, 4)


@pytest.mark.parametrize(
    ("settings", "key"),
    [
        ({"codebook_sharing": "both"}, "codebook_sharing"),
        ({"restart_liveness": "sometimes"}, "restart_liveness"),
        ({"codebook_sharing": "per_depth", "restart_liveness": "per_depth"}, "restart_liveness"),
        ({"restart_threshold": 0.0}, "restart_threshold"),
        ({"codebook_size": 0}, "codebook_size"),
    ],
)
def test_invalid_quantizer_settings_name_the_key(settings, key):
    with pytest.raises(ConfigError, match=key) as direct:
        QuantizerConfig(**settings)
    with pytest.raises(ConfigError, match=key) as loaded:
        from_dict(QuantizerConfig, settings)
    for error in (direct, loaded):
        assert "\n" not in str(error.value)
    if key in ("codebook_sharing", "restart_liveness") and len(settings) == 1:
        assert "per_depth" in str(loaded.value)  # the allowed values


def test_train_cli_refuses_a_bad_sharing_mode_and_writes_nothing(tmp_path, capsys):
    from dualtoken.cli.main import main

    out = tmp_path / "run"
    code = main(["train", "--config", "recipes/smoke-cpu-tiny.json", "--set", f"output_dir={out}",
                 "--set", 'model_overrides=["pixel_quantizer.codebook_sharing=bogus"]'])
    assert code == 2 and not out.exists()
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "codebook_sharing" in error and "per_depth" in error


def test_a_cpu_never_scores_the_search_in_bf16(monkeypatch):
    import dualtoken.quantizer as quantizer_module

    calls = []
    real = quantizer_module.residual_codes
    monkeypatch.setattr(quantizer_module, "residual_codes", lambda *a, **k: calls.append(k) or real(*a, **k))
    q = make(K=256, D=64, Q=4, search_first_pass="matmul").eval()
    x = torch.randn(100, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        codes = q(x).codes
    assert torch.equal(codes, per_depth_codes(x, q.codebook, 4))
    assert calls and all(k.get("low_precision") is None for k in calls)
