import copy

import pytest
import torch

from runtimes.torch_backend.patch import AlastPatch, PatchError
from runtimes.torch_backend.tokens import cls_attention_scores, cls_delta, ranking_scores, select_tokens
from tests.conftest import make_tiny_vit


@pytest.mark.parametrize("init_values,reg_tokens", [(None, 0), (1e-2, 0), (None, 2)])
def test_full_budget_parity_logits_and_grads(init_values, reg_tokens, batch):
    x, y = batch
    ref = make_tiny_vit(init_values=init_values, reg_tokens=reg_tokens)
    pat = copy.deepcopy(ref)
    patch = AlastPatch(pat)
    ref.train(), pat.train()
    torch.nn.functional.cross_entropy(ref(x), y).backward()
    with patch.training_forward((None,) * 4) as ctl:
        out = pat(x)
    torch.nn.functional.cross_entropy(out, y).backward()
    assert torch.allclose(out, ref(x), atol=1e-6)
    for (n, a), (_, b) in zip(ref.named_parameters(), pat.named_parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), n
    assert ctl.block_deltas().shape == (4, 6)


def test_unpatch_restores_plain_model(tiny_vit, batch):
    cls_before = [type(b) for b in tiny_vit.blocks]
    patch = AlastPatch(tiny_vit)
    assert all(type(b).__name__.startswith("Alast") for b in tiny_vit.blocks)
    with pytest.raises(PatchError, match="already patched"):
        AlastPatch(tiny_vit)
    patch.unpatch()
    assert [type(b) for b in tiny_vit.blocks] == cls_before
    assert not any(b.attn.qkv._forward_hooks for b in tiny_vit.blocks)
    AlastPatch(tiny_vit)  # can be patched again


def test_kept_tokens_follow_keep_counts_and_prefix_survives(batch):
    x, _ = batch
    model = make_tiny_vit(reg_tokens=2)
    patch = AlastPatch(model)
    assert patch.num_prefix == 3 and patch.num_patches == 16
    seen = []
    hook = model.norm.register_forward_hook(lambda m, i, o: seen.append(o.shape[1]))
    model.train()
    with patch.training_forward((12, None, 6, 3)) as ctl:
        model(x)
    assert ctl.tokens_in == [16, 12, 12, 6]
    assert seen == [3 + 3]
    hook.remove()


def test_eval_mode_uses_all_tokens(tiny_vit, batch):
    x, _ = batch
    patch = AlastPatch(tiny_vit)
    ref = copy.deepcopy(tiny_vit)
    patch_ref = ref._alast_patch
    patch_ref.unpatch()
    tiny_vit.eval(), ref.eval()
    with patch.training_forward((2, 2, 2, 2)):
        out = tiny_vit(x)
    assert torch.allclose(out, ref(x), atol=1e-6)


def test_select_tokens_keeps_cls_and_top_scores():
    x = torch.arange(2 * 5 * 1, dtype=torch.float).reshape(2, 5, 1)
    scores = torch.tensor([[9.0, 0.1, 0.9, 0.2, 0.8], [9.0, 0.7, 0.1, 0.6, 0.2]])
    out = select_tokens(x, scores, 2, num_prefix=1)
    assert out[:, 0, 0].tolist() == [0.0, 5.0]           # CLS kept
    assert out[0, 1:, 0].tolist() == [2.0, 4.0]          # patches 2 and 4, original order
    assert out[1, 1:, 0].tolist() == [6.0, 8.0]          # per-sample indices


def test_ranking_scores_top_sample_and_random():
    """'top' ranks by the scores; 'sample' draws in proportion to them (a token holding the whole
    score is always kept, one scoring zero never); 'random' ignores them."""
    torch.manual_seed(0)
    scores = torch.tensor([[0.5, 0.5, 0.0, 0.0, 0.0, 0.0]]).expand(400, -1).contiguous()  # CLS, then 5 patches
    assert torch.equal(ranking_scores(scores, "top"), scores)

    def kept(select):
        x = torch.arange(6, dtype=torch.float).reshape(1, 6, 1).expand(400, -1, -1)
        return select_tokens(x, scores, 2, num_prefix=1, rank=ranking_scores(scores, select))[:, 1:, 0]

    sampled = kept("sample")
    assert (sampled == 1).any(dim=1).all()  # the token with every bit of attention: always kept
    assert len({tuple(r) for r in sampled.tolist()}) > 1  # the second slot is drawn
    uniform = kept("random")
    assert (uniform == 1).any(dim=1).float().mean() < 0.6  # about 2 in 5: attention plays no part
    assert set(uniform.flatten().tolist()) == {1.0, 2.0, 3.0, 4.0, 5.0}
    with pytest.raises(ValueError, match="unknown token selection 'best'"):
        ranking_scores(scores, "best")


@pytest.mark.parametrize("select", ["top", "sample", "random"])
def test_patched_blocks_select_tokens_as_the_control_says(tiny_vit, batch, select):
    """Two training forwards of one batch keep the same tokens with 'top', and draw anew otherwise."""
    x, _ = batch
    patch = AlastPatch(tiny_vit)
    patch.control.select = select
    tiny_vit.train()
    torch.manual_seed(0)
    with torch.no_grad(), patch.training_forward((8, 4, 2, 2)):
        first, second = tiny_vit(x), tiny_vit(x)
    assert torch.equal(first, second) == (select == "top")


def test_select_tokens_backward_keeps_indices_not_the_block_output():
    """The gradient equals torch.gather's, but only int64 indices are saved for it (the block's
    full output, every entering token, is freed after selection)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 9, 4, generator=g, requires_grad=True)
    scores = torch.rand(3, 9, generator=g)
    upstream = torch.randn(3, 5, 4, generator=g)
    saved = []

    def pack(t):
        saved.append((t.dtype, t.untyped_storage().nbytes()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = select_tokens(x, scores, 4, num_prefix=1)
    (out * upstream).sum().backward()
    assert saved and all(dtype == torch.int64 for dtype, _ in saved)
    idx = scores[:, 1:].topk(4, dim=-1).indices.sort(dim=-1).values
    ref_x = x.detach().clone().requires_grad_(True)
    ref = torch.cat([ref_x[:, :1], torch.gather(ref_x[:, 1:], 1, idx.unsqueeze(-1).expand(-1, -1, 4))], dim=1)
    (ref * upstream).sum().backward()
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    torch.testing.assert_close(x.grad, ref_x.grad, rtol=0, atol=0)


def test_select_tokens_fuses_the_dropped_tokens_into_the_last_slot():
    """EViT's fusion: keep - 1 top tokens, then the score-weighted mean of the dropped ones; the
    sequence is as long as without fusion, and the dropped tokens get gradient through the fused one."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 7, 3, generator=g, requires_grad=True)
    scores = torch.tensor([[9.0, 0.1, 0.9, 0.2, 0.8, 0.3, 0.5], [9.0, 0.7, 0.1, 0.6, 0.2, 0.05, 0.9]])
    out = select_tokens(x, scores, 3, num_prefix=1, fuse=True)
    assert out.shape == (2, 4, 3)
    torch.testing.assert_close(out[:, :3], select_tokens(x, scores, 2, num_prefix=1))
    for b, dropped in ((0, [1, 3, 5, 6]), (1, [2, 3, 4, 5])):
        w = scores[b, dropped] / scores[b, dropped].sum()
        torch.testing.assert_close(out[b, 3], (w[:, None] * x[b, dropped]).sum(0))
    out[:, 3].sum().backward()
    assert torch.allclose(x.grad[0, 1, 0], scores[0, 1] / scores[0, [1, 3, 5, 6]].sum())
    assert x.grad[0, 2].abs().sum() == 0  # kept tokens reach the loss through their own slot only


def test_fused_tokens_cost_what_plain_dropping_costs_plus_the_weighted_sums(tiny_vit, batch):
    """Same kept counts, so the same block FLOPs as dropping after whole blocks (the fused token takes
    a kept slot); fusion adds one weighted sum over the entering tokens per selecting block: 2 x
    tokens x dim per image. Fusion needs the dropped tokens' outputs, so it never selects inside."""
    from runtimes.torch_backend.flops import counter
    x, _ = batch
    patch = AlastPatch(tiny_vit)
    tiny_vit.train()
    for b in patch.blocks:
        b._alast_in_block = False  # plain dropping as fusion runs it: whole blocks
    flops, logits = [], []
    for fuse in (False, True):
        patch.control.fuse = fuse
        with patch.training_forward((10, 6, 3, 2)) as ctl, counter() as fc:
            logits.append(tiny_vit(x))
        flops.append(fc.get_total_flops())
        assert ctl.tokens_in == [16, 10, 6, 3]
    assert flops[1] - flops[0] == 2 * x.shape[0] * tiny_vit.embed_dim * sum(ctl.tokens_in)
    assert not torch.allclose(logits[0], logits[1])


def test_cls_delta_hand_computed():
    x_in = torch.zeros(2, 3, 2)
    x_out = torch.zeros(2, 3, 2)
    x_out[0, 0] = torch.tensor([3.0, 4.0])
    x_out[1, 1] = 7.0  # not the CLS token: no effect
    assert cls_delta(x_in, x_out).tolist() == [25.0, 0.0]
    # without a class token: the mean update of the tokens from the pool position on
    x_out = torch.zeros(2, 3, 2)
    x_out[0, 0] = 100.0  # a register token: not pooled
    x_out[0, 1] = torch.tensor([4.0, 2.0])
    x_out[0, 2] = torch.tensor([2.0, 0.0])
    x_out[1, 1], x_out[1, 2] = 5.0, -5.0  # updates that cancel in the mean
    assert cls_delta(x_in, x_out, pool=1).tolist() == [10.0, 0.0]  # ||(3, 1)||^2
    with pytest.raises(ValueError, match="same tokens"):
        cls_delta(x_in, x_out[:, :2], pool=1)


def test_pooled_scores_rank_by_the_mean_query():
    """A model without a class token scores its tokens with the attention row of its patch tokens'
    mean query (one row, as cheap as the class token's)."""
    model = make_tiny_vit(reg_tokens=2, global_pool="avg")
    attn = model.blocks[0].attn
    qkv = attn.qkv(torch.randn(3, 18, 32))
    q, k, v = qkv.reshape(3, 18, 3, 2, 16).permute(2, 0, 3, 1, 4)  # [B, H, N, d]
    row = ((q[:, :, 2:].mean(2, keepdim=True) * attn.scale) @ k.transpose(-2, -1)).softmax(-1)[:, :, 0]
    scores = cls_attention_scores(qkv, attn.num_heads, attn.head_dim, attn.scale, attn.q_norm, attn.k_norm, pool=2)
    assert torch.allclose(scores, row.mean(1), atol=1e-6)
    contribution = cls_attention_scores(qkv, attn.num_heads, attn.head_dim, attn.scale, attn.q_norm, attn.k_norm,
                                        "contribution", pool=2)
    assert torch.allclose(contribution, (row.unsqueeze(-1) * v).norm(dim=-1).mean(1), atol=1e-6)
    assert AlastPatch(model).pool == 2 and AlastPatch(make_tiny_vit()).pool is None


def test_cls_attention_scores_match_explicit_attention(tiny_vit):
    attn = tiny_vit.blocks[0].attn
    x = torch.randn(3, 17, 32)
    qkv = attn.qkv(x)
    scores = cls_attention_scores(qkv, attn.num_heads, attn.head_dim, attn.scale, attn.q_norm, attn.k_norm)
    q, k, _ = qkv.reshape(3, 17, 3, 2, 16).permute(2, 0, 3, 1, 4)
    full = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(-1)  # [B, H, N, N]
    assert torch.allclose(scores, full[:, :, 0].mean(1), atol=1e-6)
    assert torch.allclose(scores.sum(-1), torch.ones(3))
    _, _, v = qkv.reshape(3, 17, 3, 2, 16).permute(2, 0, 3, 1, 4)  # [B, H, N, d]
    contribution = cls_attention_scores(qkv, attn.num_heads, attn.head_dim, attn.scale, attn.q_norm,
                                        attn.k_norm, "contribution")
    # per head, the norm of the term token j adds to the class token's attention output, then the mean
    assert torch.allclose(contribution, (full[:, :, 0].unsqueeze(-1) * v).norm(dim=-1).mean(1), atol=1e-6)
    with pytest.raises(ValueError, match="unknown token score 'gradient'"):
        cls_attention_scores(qkv, attn.num_heads, attn.head_dim, attn.scale, attn.q_norm, attn.k_norm, "gradient")


def test_token_dropping_changes_flops_and_logits(tiny_vit, batch):
    from runtimes.torch_backend.flops import counter

    x, _ = batch
    patch = AlastPatch(tiny_vit)
    tiny_vit.train()
    with counter() as full_count, patch.training_forward((None,) * 4):
        full = tiny_vit(x)
    with counter() as drop_count, patch.training_forward((4, 2, 1, 1)):
        dropped = tiny_vit(x)
    assert drop_count.get_total_flops() < 0.5 * full_count.get_total_flops()
    assert not torch.allclose(full, dropped)


def test_non_vit_is_refused():
    with pytest.raises(PatchError, match="not a timm VisionTransformer"):
        AlastPatch(torch.nn.Linear(2, 2))
    from timm.models.vision_transformer import VisionTransformer

    m = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, class_token=False,
                          global_pool="")
    with pytest.raises(PatchError, match="neither a class token nor a pooled head .*global_pool=''.* use "
                                         "global_pool='avg' or 'map'"):
        AlastPatch(m)


def _run_dropping(model, patch, x, y, keep):
    model.zero_grad(set_to_none=True)
    with patch.training_forward(keep) as ctl:
        logits = model(x)
    torch.nn.functional.cross_entropy(logits, y).backward()
    return logits, list(ctl.block_deltas()), {n: p.grad.clone() for n, p in model.named_parameters()
                                                     if p.grad is not None}


@pytest.mark.parametrize("init_values,reg_tokens,pool", [(None, 0, "token"), (1e-2, 2, "token"), (None, 0, "avg"),
                                                         (1e-2, 2, "map")])
def test_selecting_inside_the_block_equals_the_whole_block_then_selection(init_values, reg_tokens, pool, batch):
    """Only the kept tokens are queries and pass the MLP; their outputs, the deltas and every
    gradient are those of the whole block followed by the selection (also without a class token,
    where the deltas read the kept tokens' mean update)."""
    from runtimes.torch_backend.flops import counter

    x, y = batch
    model = make_tiny_vit(init_values=init_values, reg_tokens=reg_tokens, global_pool=pool)
    patch = AlastPatch(model)
    model.train()
    assert all(b._alast_in_block for b in patch.blocks)
    keep = (12, None, 5, 2)
    with counter() as inside:
        got = _run_dropping(model, patch, x, y, keep)
    for b in patch.blocks:
        b._alast_in_block = False  # the whole block, then the selection
    with counter() as whole:
        ref = _run_dropping(model, patch, x, y, keep)
    assert torch.allclose(got[0], ref[0], atol=1e-5)
    assert all(torch.allclose(a, b, rtol=1e-5) for a, b in zip(got[1], ref[1]))
    assert got[2].keys() == ref[2].keys()
    for name in ref[2]:
        assert torch.allclose(got[2][name], ref[2][name], atol=1e-5), name
    assert inside.get_total_flops() < 0.9 * whole.get_total_flops()


def test_blocks_of_another_class_run_whole_then_drop(batch):
    from timm.models.vision_transformer import Block

    from runtimes.torch_backend.patch import selects_in_block

    class OwnBlock(Block):
        def forward(self, x, **kwargs):
            return super().forward(x, **kwargs) * 1.0

    x, _ = batch
    model = make_tiny_vit()
    assert selects_in_block(model.blocks[0])
    model.blocks[1].__class__ = OwnBlock
    patch = AlastPatch(model)
    assert [b._alast_in_block for b in patch.blocks] == [True, False, True, True]
    model.train()
    with patch.training_forward((12, 6, 3, 2)) as ctl:
        model(x)
    assert ctl.tokens_in == [16, 12, 6, 3]


def test_trimming_the_last_block_changes_no_logit_nor_gradient(batch):
    """policy.trim_last keeps min_tokens patch tokens after the last block of a class-token head: the
    logits and gradients are those of keeping them all, at a fraction of the block's FLOPs."""
    from runtimes.token_schedule import head_reads_prefix
    from runtimes.torch_backend.flops import counter

    x, y = batch
    model = make_tiny_vit(reg_tokens=2)
    assert head_reads_prefix(model)
    assert not head_reads_prefix(make_tiny_vit_pooled())
    patch = AlastPatch(model)
    model.train()
    torch.manual_seed(0)
    with counter() as whole:
        ref = _run_dropping(model, patch, x, y, (12, 6, None, None))
    torch.manual_seed(0)
    with counter() as trimmed:
        got = _run_dropping(model, patch, x, y, (12, 6, None, 1))
    assert torch.allclose(got[0], ref[0], atol=1e-5)
    for name in ref[2]:
        assert torch.allclose(got[2][name], ref[2][name], atol=1e-5), name
    assert trimmed.get_total_flops() < whole.get_total_flops()


def make_tiny_vit_pooled():
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, global_pool="avg")


@pytest.mark.parametrize("name,needle", [
    ("vit_dwee_patch16_reg1_gap_256", "has DiffAttention, whose qkv projection is not one query, key and value per head"),
    ("vit_base_patch16_xp_224", "is a ParallelScalingBlock, with no attention module of its own"),
])
def test_blocks_alast_cannot_read_are_refused_by_name(name, needle):
    """Blocks that look like ViT blocks but are not timm's (differential attention: two maps per head;
    parallel blocks: attention fused with the MLP) are refused in one line naming their class."""
    import timm

    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False, num_classes=3)
    with pytest.raises(PatchError, match=needle):
        AlastPatch(model)


@pytest.mark.parametrize("keep", [(None,) * 4, (12, None, 5, 2)])
def test_block_deltas_are_each_blocks_class_token_update(keep, batch):
    """The deltas come out of one buffer of class tokens (each block's input is the block before's
    output): they equal ``cls_delta`` of every block's own input and output, dropping or not."""
    x, _ = batch
    model = make_tiny_vit(reg_tokens=2)
    patch = AlastPatch(model)
    model.train()
    seen = []
    hooks = [b.register_forward_hook(lambda m, i, o: seen.append((i[0].detach(), o.detach()))) for b in model.blocks]
    with patch.training_forward(keep) as ctl:
        model(x)
    for h in hooks:
        h.remove()
    want = torch.stack([cls_delta(i, o) for i, o in seen])
    assert ctl.block_deltas().shape == (4, x.shape[0])
    assert torch.allclose(ctl.block_deltas(), want, rtol=1e-6, atol=0)
    assert (want > 0).all()


def test_sampled_tokens_are_the_gumbel_top_k_of_the_same_draws():
    """'sample' ranks by log(u) / s: with the same uniform draws it keeps exactly the tokens the
    Gumbel-top-k of log(s) keeps (computed here in float64, away from rounding ties)."""
    from runtimes.torch_backend.tokens import kept_indices

    g = torch.Generator().manual_seed(3)
    scores = torch.rand(64, 50, generator=g).pow(3)
    scores[:, 7] = 0.0  # a zero score is ranked too
    noise = torch.rand(64, 50, generator=g)
    gumbel = scores.double().clamp_min(1e-30).log() - torch.log(-torch.log(noise.double()))
    for keep in (1, 10, 40):
        got = kept_indices(ranking_scores(scores, "sample", noise), keep, num_prefix=1)
        want = kept_indices(gumbel, keep, num_prefix=1)
        assert torch.equal(got, want), keep
        assert (got[:, 0] == 0).all() and (got[:, 1:].diff(dim=1) > 0).all()


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_a_tempered_sample_keeps_a_token_in_proportion_to_its_score_to_the_power_one_over_t(temperature):
    """policy.token_temperature: one token of four kept, drawn 40,000 times: each is kept with
    probability s ** (1 / T) / sum; the tempered draws of the same uniforms give the same ranks as
    the Gumbel-top-k of log(s) / T."""
    from runtimes.torch_backend.tokens import kept_indices, tempered

    g = torch.Generator().manual_seed(5)
    scores = torch.tensor([[0.0, 1.0, 2.0, 4.0, 8.0]]).expand(40_000, -1)  # a prefix token, then four patches
    kept = kept_indices(ranking_scores(scores, "sample", generator=g, temperature=temperature), 1, num_prefix=1)
    freq = torch.bincount(kept[:, 1] - 1, minlength=4).float() / 40_000
    want = scores[0, 1:].pow(1 / temperature)
    assert torch.allclose(freq, want / want.sum(), atol=0.01), freq
    u = torch.rand(64, 5, generator=g)
    gumbel = scores[:64].double().clamp_min(1e-30).log() / temperature - torch.log(-torch.log(u.double()))
    got = kept_indices(ranking_scores(scores[:64], "sample", tempered(u, temperature)), 2, num_prefix=1)
    assert torch.equal(got, kept_indices(gumbel, 2, num_prefix=1))


def test_a_temperature_is_refused_where_nothing_is_drawn_by_score():
    from alast.config import load_config
    from alast.config_schema import ConfigError

    for select in ("top", "random"):
        with pytest.raises((ConfigError, ValueError), match="token_temperature=0.3 shapes the draws"):
            load_config(None, [f"policy.token_select={select}", "policy.token_temperature=0.3"])
    assert load_config(None, ["policy.token_select=top"]).policy.token_select == "top"  # the default is no refusal
    with pytest.raises((ConfigError, ValueError), match="token_temperature"):
        load_config(None, ["policy.token_temperature=0"])
