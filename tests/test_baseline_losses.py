"""Baseline distillation losses (cwd, cirkd, skd, bpkd): each checked against a direct float64
numpy / loop implementation of its method.md §4 formula, plus the properties training relies on."""
import numpy as np
import pytest
import torch

from distill.losses import DistillInputs, LossContext, build_loss, build_losses
from distill.losses.bpkd import edge_kl, edge_mask
from distill.losses.cirkd import minibatch_relation_kl, push_ring, relation_kl_sum
from distill.losses.cwd import channel_wise_kl
from distill.losses.functional import as_float, to_stride
from distill.losses.skd import pairwise_explicit, pairwise_gram
from runtime.errors import BckdError

F64 = torch.float64
CTX = LossContext(student_decoder_channels=3, teacher_decoder_channels=5, num_classes=3,
                  ignore_index=255)
SAME = LossContext(student_decoder_channels=4, teacher_decoder_channels=4, num_classes=3)


def _randn(*shape, seed=0, grad=False):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)
    return x.requires_grad_(grad)


def _log_softmax(z, axis):
    z = z - z.max(axis=axis, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=axis, keepdims=True))


def _kl_rows(zt, zs, axis):
    """Σ over ``axis`` of KL(softmax(zt) ‖ softmax(zs)), elementwise elsewhere."""
    lt, ls = _log_softmax(zt, axis), _log_softmax(zs, axis)
    return (np.exp(lt) * (lt - ls)).sum(axis=axis)


def _np_cwd(ys, yt, tau):
    b, c = ys.shape[:2]
    total = sum(_kl_rows(yt[i, j].ravel() / tau, ys[i, j].ravel() / tau, 0)
                for i in range(b) for j in range(c))
    return tau * tau * total / (b * c)


def _np_block_max(x, k):
    b, c, h, w = x.shape
    hh, ww = -(-h // k[0]), -(-w // k[1])
    out = np.empty((b, c, hh, ww))
    for i in range(hh):
        for j in range(ww):
            out[:, :, i, j] = x[:, :, i * k[0]:(i + 1) * k[0], j * k[1]:(j + 1) * k[1]].max((2, 3))
    return out


def _np_unit(x):
    x = x.reshape(x.shape[0], x.shape[1], -1)
    return x / (np.sqrt((x ** 2).sum(1, keepdims=True)) + 1e-8)


def _inputs(s_logits, t_logits, s_dec=None, t_dec=None, target=None):
    return DistillInputs(s_logits, t_logits, target=target, student_decoder=s_dec,
                         teacher_decoder=t_dec)


# --- cwd -------------------------------------------------------------------------------------

@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_cwd_equals_plain_definition(tau):
    ys, yt = _randn(2, 3, 4, 5, seed=1), _randn(2, 3, 4, 5, seed=2)
    want = _np_cwd(ys.numpy(), yt.numpy(), tau)
    assert channel_wise_kl(ys, yt, tau).item() == pytest.approx(want, rel=1e-12)
    loss = build_loss("cwd", CTX, tau=tau, logit_stride=1)
    assert loss(_inputs(ys, yt)).item() == pytest.approx(want, rel=1e-12)


def test_cwd_logits_are_area_downsampled_to_logit_stride():
    ys, yt = _randn(2, 3, 8, 12, seed=3), _randn(2, 3, 8, 12, seed=4)

    def blocks(x):  # 4x4 block means of (2, 3, 8, 12) -> (2, 3, 2, 3)
        return x.numpy().reshape(2, 3, 2, 4, 3, 4).mean((3, 5))

    want = _np_cwd(blocks(ys), blocks(yt), 4.0)
    got = build_loss("cwd", CTX, logit_stride=4)(_inputs(ys, yt)).item()
    assert got == pytest.approx(want, rel=1e-12)
    assert to_stride(ys, 3).shape[-2:] == (3, 4)  # ceil(8/3), ceil(12/3)


def test_cwd_on_decoder_projects_student_to_teacher_channels():
    loss = build_loss("cwd", CTX, on="decoder").double()
    assert loss.needs_features and loss.default_weight == 3.0
    s, t = _randn(2, 3, 4, 4, seed=5, grad=True), _randn(2, 5, 4, 4, seed=6, grad=True)
    z = _randn(2, 2, 16, 16)
    got = loss(_inputs(z, z, s, t))
    w = loss.align.weight.detach().numpy()[:, :, 0, 0]  # (5, 3)
    proj = np.einsum("oc,bchw->bohw", w, s.detach().numpy())
    assert got.item() == pytest.approx(_np_cwd(proj, t.detach().numpy(), 4.0), rel=1e-12)
    got.backward()
    assert s.grad.abs().sum() > 0 and loss.align.weight.grad.abs().sum() > 0 and t.grad is None


def test_cwd_decoder_resizes_a_finer_teacher_map():
    loss = build_loss("cwd", SAME, on="decoder")
    s, t = _randn(1, 4, 4, 4, seed=7), _randn(1, 4, 8, 8, seed=8)
    z = _randn(1, 2, 8, 8)
    want = channel_wise_kl(s, torch.nn.functional.avg_pool2d(t, 2), 4.0)
    assert loss(_inputs(z, z, s, t)).item() == pytest.approx(want.item(), rel=1e-12)


# --- skd -------------------------------------------------------------------------------------

def _np_skd(fs, ft, kernel):
    us, ut = _np_unit(_np_block_max(fs, kernel)), _np_unit(_np_block_max(ft, kernel))
    a_s = np.einsum("bcm,bcn->bmn", us, us)
    a_t = np.einsum("bcm,bcn->bmn", ut, ut)
    n = a_s.shape[1]
    return ((a_t - a_s) ** 2).sum() / (n * n) / fs.shape[0]


@pytest.mark.parametrize("size, kernel, nodes", [((6, 8), (3, 4), 4), ((5, 7), (2, 3), 9)])
def test_skd_scale_mode_matches_source_formula(size, kernel, nodes):
    fs, ft = _randn(2, 3, *size, seed=9), _randn(2, 5, *size, seed=10)
    loss = build_loss("skd")
    assert loss._kernel(fs.shape[-2:]) == kernel
    assert np.prod(_np_block_max(fs.numpy(), kernel).shape[-2:]) == nodes
    got = loss(_inputs(fs, ft, fs, ft)).item()
    assert got == pytest.approx(_np_skd(fs.numpy(), ft.numpy(), kernel), rel=1e-12)


def test_skd_window_mode_and_gram_shortcut_equal_explicit_form():
    fs, ft = _randn(2, 3, 6, 7, seed=11), _randn(2, 5, 6, 7, seed=12)
    got = build_loss("skd", mode="window")(_inputs(fs, ft, fs, ft)).item()
    assert got == pytest.approx(_np_skd(fs.numpy(), ft.numpy(), (2, 2)), rel=1e-12)
    assert pairwise_gram(fs, ft).item() == pytest.approx(pairwise_explicit(fs, ft).item(),
                                                         rel=1e-10, abs=1e-12)
    s = fs.clone().requires_grad_(True)
    g1, = torch.autograd.grad(pairwise_gram(s, ft), s)
    g2, = torch.autograd.grad(pairwise_explicit(s, ft), s)
    torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-12)


# --- cirkd -----------------------------------------------------------------------------------

def _np_minibatch(fs, ft, tau):
    def unit(x):
        x = x.reshape(x.shape[0], x.shape[1], -1).transpose(0, 2, 1)
        return x / np.sqrt((x ** 2).sum(2, keepdims=True))
    xs, xt = unit(fs), unit(ft)
    b, n = xs.shape[:2]
    total = sum(_kl_rows(xt[u] @ xt[v].T / tau, xs[u] @ xs[v].T / tau, 1).sum()
                for u in range(b) for v in range(b))
    return total / (b * b * n)


@pytest.mark.parametrize("chunk", [0, 3])
def test_cirkd_minibatch_matches_definition(chunk):
    fs, ft = _randn(3, 3, 3, 4, seed=13), _randn(3, 5, 3, 4, seed=14)
    want = _np_minibatch(fs.numpy(), ft.numpy(), 0.1)
    loss = build_loss("cirkd", CTX, chunk=chunk)
    z = _randn(3, 3, 8, 8)
    assert loss(_inputs(z, z, fs, ft)).item() == pytest.approx(want, rel=1e-12)
    assert loss.last_terms["minibatch"] == pytest.approx(want, rel=1e-12)


def test_cirkd_minibatch_pool_averages_2x2_first():
    fs, ft = _randn(2, 3, 4, 6, seed=15), _randn(2, 5, 4, 6, seed=16)

    def pool(x):
        return x.numpy().reshape(2, -1, 2, 2, 3, 2).mean((3, 5))

    got = minibatch_relation_kl(fs, ft, 0.1, pool=True).item()
    assert got == pytest.approx(_np_minibatch(pool(fs), pool(ft), 0.1), rel=1e-12)


def test_cirkd_chunked_rows_recompute_gives_same_gradients():
    q, k = _randn(7, 4, seed=17, grad=True), _randn(5, 4, seed=18)
    qt, kt = _randn(7, 6, seed=19), _randn(5, 6, seed=20)
    grads = []
    for chunk in (0, 2):
        q.grad = None
        relation_kl_sum(q, k, qt, kt, 0.5, chunk).backward()
        grads.append(q.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=1e-14)


def _memory_loss(**opts):
    base = dict(variant="memory", pixel_queue=4, region_queue=2, pixel_samples=12,
                region_samples=6, pixel_update=2)
    # Seeded: with an unlucky projection init a pixel's ReLU output is all zero, and the
    # reference's plain normalisation divides 0 by 0 where F.normalize's eps does not.
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return build_loss("cirkd", CTX, **{**base, **opts}).double()


def test_cirkd_memory_matches_definition_with_fixed_queues():
    # pixel/region samples per class (12//3+1, 6//3+1) cover each whole queue, so the random
    # draw only permutes the keys, which a row softmax does not see.
    loss = _memory_loss(kd_tau=2.0).eval()  # eval: no enqueue, BatchNorm uses running stats
    s, t = _randn(2, 3, 3, 4, seed=21, grad=True), _randn(2, 5, 3, 4, seed=22)
    target = torch.randint(0, 3, (2, 6, 8), generator=torch.Generator().manual_seed(0))
    target[0, :2] = 255
    z = _randn(2, 3, 6, 8)
    got = loss(_inputs(z, z, s, t, target))

    w1 = loss.project[0].weight.detach().numpy()[:, :, 0, 0]
    w2 = loss.project[3].weight.detach().numpy()[:, :, 0, 0]
    h = np.einsum("oc,bchw->bohw", w1, s.detach().numpy()) / np.sqrt(1 + 1e-5)
    p = np.einsum("oc,bchw->bohw", w2, np.maximum(h, 0))

    def anchors(x):
        x = x.transpose(0, 2, 3, 1).reshape(-1, x.shape[1])
        return x / np.sqrt((x ** 2).sum(1, keepdims=True))
    keep = (target[:, ::2, ::2].numpy().ravel() != 255)
    a_s, a_t = anchors(p)[keep], anchors(t.numpy())[keep]
    want = 0.0
    for bank, weight in ((loss.pixel_bank, 0.1), (loss.region_bank, 0.1)):
        keys = bank.numpy().reshape(-1, 5)
        kl = _kl_rows(a_t @ keys.T / 0.2, a_s @ keys.T / 0.2, 1)
        want += weight * 4.0 * kl.mean()
    assert got.item() == pytest.approx(want, rel=1e-12)
    got.backward()
    assert s.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in loss.project.parameters())


def test_cirkd_push_ring_follows_cirkd_pointer_rule():
    bank, ptr = torch.zeros(2, 5, 1), torch.zeros(2, dtype=torch.long)
    rows = torch.arange(1.0, 100.0)[:, None]
    push_ring(bank, ptr, 1, rows[:2])          # slots 0,1
    assert ptr.tolist() == [0, 2] and bank[1, :, 0].tolist() == [1, 2, 0, 0, 0]
    push_ring(bank, ptr, 1, rows[2:4])         # slots 2,3
    assert ptr.tolist() == [0, 4]
    push_ring(bank, ptr, 1, rows[4:6])         # 4 + 2 >= 5: the last two slots, pointer to 0
    assert ptr.tolist() == [0, 0] and bank[1, :, 0].tolist() == [1, 2, 3, 5, 6]
    push_ring(bank, ptr, 1, rows[6:7])
    assert ptr.tolist() == [0, 1] and bank[1, :, 0].tolist() == [7, 2, 3, 5, 6]
    assert bank[0].abs().sum() == 0


def test_cirkd_enqueue_pushes_teacher_regions_and_pixels_per_class():
    loss = _memory_loss().train()
    t = _randn(1, 5, 2, 2, seed=23)
    target = torch.tensor([[[0, 0, 255, 255], [0, 0, 255, 255],
                            [1, 1, 0, 0], [1, 1, 0, 0]]])  # -> [[0, 255], [1, 0]] at 2x2
    loss(_inputs(_randn(1, 3, 4, 4), _randn(1, 3, 4, 4), _randn(1, 3, 2, 2), t, target))
    assert loss.region_ptr.tolist() == [1, 1, 0] and loss.pixel_ptr.tolist() == [2, 1, 0]
    emb = torch.nn.functional.normalize(t[0].flatten(1), dim=0)  # (5, 4): pixels 0, 1, 2, 3
    region0 = torch.nn.functional.normalize(emb[:, [0, 3]].mean(1), dim=0)
    torch.testing.assert_close(loss.region_bank[0, 0], region0)
    torch.testing.assert_close(loss.region_bank[1, 0], emb[:, 2])
    pushed = loss.pixel_bank[0, :2]  # both class-0 pixels, in random order
    pushed = pushed[pushed[:, 0].argsort()]
    want = emb[:, [0, 3]].T
    torch.testing.assert_close(pushed, want[want[:, 0].argsort()])
    loss.eval()
    loss(_inputs(_randn(1, 3, 4, 4), _randn(1, 3, 4, 4), _randn(1, 3, 2, 2), t, target))
    assert loss.region_ptr.tolist() == [1, 1, 0]  # no enqueue outside training


def test_cirkd_memory_state_resumes_exactly():
    torch.manual_seed(0)
    loss = _memory_loss(variant="both")
    batch = _inputs(_randn(2, 3, 8, 8), _randn(2, 3, 8, 8), _randn(2, 3, 4, 4, seed=1),
                    _randn(2, 5, 4, 4, seed=2), torch.randint(0, 3, (2, 8, 8)))
    loss(batch)
    state, rng = {k: v.clone() for k, v in loss.state_dict().items()}, torch.get_rng_state()
    assert {"pixel_bank", "pixel_ptr", "region_bank", "region_ptr"} <= set(state)
    first = [loss(batch).item() for _ in range(2)]
    resumed = _memory_loss(variant="both")
    resumed.load_state_dict(state)
    torch.set_rng_state(rng)
    assert [resumed(batch).item() for _ in range(2)] == first


def test_cirkd_memory_needs_target_and_ignores_all_ignored_batch():
    loss = _memory_loss()
    s = _randn(1, 3, 2, 2, grad=True)
    z = _randn(1, 3, 4, 4)
    with pytest.raises(ValueError, match="needs the ground-truth target"):
        loss(_inputs(z, z, s, _randn(1, 5, 2, 2)))
    out = loss(_inputs(z, z, s, _randn(1, 5, 2, 2), torch.full((1, 4, 4), 255)))
    assert out.item() == 0.0
    out.backward()


# --- bpkd ------------------------------------------------------------------------------------

def test_bpkd_edge_mask_on_hand_made_labels():
    target = torch.zeros(1, 6, 6, dtype=torch.long)
    target[0, :, 3:] = 1
    target[0, 0, 0] = 255
    mask = edge_mask(target, 3, 3, 255, (6, 6))
    band = np.zeros((6, 6))
    band[:, 2:4] = 1  # 3x3 dilation minus erosion around the vertical 0|1 boundary
    c0 = band.copy()
    c0[0:2, 0:2] = 1  # class 0 also borders the ignore pixel (zeroed in the one-hot)...
    c0[0, 0] = 0      # ...which itself is never an edge
    c1 = band.copy()
    c1[0, 0] = 0
    np.testing.assert_array_equal(mask[0, 0].numpy(), c0)
    np.testing.assert_array_equal(mask[0, 1].numpy(), c1)
    assert mask[0, 2].sum() == 0
    pooled = edge_mask(target, 3, 3, 255, (3, 3))[0, 0]  # 2x2 block means at logit size
    np.testing.assert_array_equal(pooled.numpy(), [[0.75, 1, 0], [0, 1, 0], [0, 1, 0]])


def _np_edge_mask(target, k, w, ignore):
    b, hh, ww = target.shape
    r = w // 2
    valid = target != ignore
    out = np.zeros((b, k, hh, ww))
    for n in range(b):
        for c in range(k):
            y = ((target[n] == c) & valid[n]).astype(float)
            for i in range(hh):
                for j in range(ww):
                    win = y[max(i - r, 0):i + r + 1, max(j - r, 0):j + r + 1]
                    out[n, c, i, j] = (win.max() - win.min()) * valid[n, i, j]
    return out


def test_bpkd_matches_definition():
    target = torch.randint(0, 3, (2, 8, 8), generator=torch.Generator().manual_seed(1))
    target[1, 5:, :3] = 255
    zs, zt = _randn(2, 3, 8, 8, seed=24, grad=True), _randn(2, 3, 8, 8, seed=25, grad=True)
    loss = build_loss("bpkd", CTX, trimap=3, logit_stride=2)
    got = loss(_inputs(zs, zt, target=target))

    def down(x):
        return x.reshape(2, 3, 4, 2, 4, 2).mean((3, 5))
    m = down(_np_edge_mask(target.numpy(), 3, 3, 255))
    s, t = down(zs.detach().numpy()), down(zt.detach().numpy())
    tau = 4.0
    phi = tau * tau * _kl_rows(t * m / tau, s * m / tau, 1)  # (B, h, w)
    n = np.maximum((m > 0).sum((2, 3)), 1)
    edge = 2.0 * ((phi[:, None] * m).sum((2, 3)) / n).sum(1).mean()
    body = _np_cwd(s * (1 - m), t * (1 - m), tau)
    assert loss.last_terms["edge"] == pytest.approx(1 * edge, rel=1e-12)  # default weights 1, 3
    assert loss.last_terms["body"] == pytest.approx(3 * body, rel=1e-12)
    assert got.item() == pytest.approx(1 * edge + 3 * body, rel=1e-12)
    got.backward()
    assert zs.grad.abs().sum() > 0 and zt.grad is None


def test_bpkd_edge_kl_is_zero_without_edges():
    z = _randn(1, 3, 4, 4)
    assert edge_kl(z, z + 1.0, torch.zeros_like(z), 4.0, 2.0).item() == 0.0


# --- shared properties -----------------------------------------------------------------------

def _full_inputs(ctx, same=False, grad=True, dtype=F64):
    zs = _randn(2, ctx.num_classes, 16, 16, seed=30).to(dtype)
    ds = _randn(2, ctx.student_decoder_channels, 4, 4, seed=31).to(dtype)
    zt = zs.clone() if same else _randn(2, ctx.num_classes, 16, 16, seed=32).to(dtype)
    dt = ds.clone() if same else _randn(2, ctx.teacher_decoder_channels, 4, 4, seed=33).to(dtype)
    target = torch.randint(0, ctx.num_classes, (2, 16, 16),
                           generator=torch.Generator().manual_seed(2))
    for x in (zs, ds, zt, dt):
        x.requires_grad_(grad)
    return DistillInputs(zs, zt, target=target, student_decoder=ds, teacher_decoder=dt)


ZERO_WHEN_EQUAL = [("cwd", {}), ("cwd", {"on": "decoder"}), ("skd", {}),
                   ("skd", {"mode": "window"}), ("cirkd", {}), ("bpkd", {})]


@pytest.mark.parametrize("name, opts", ZERO_WHEN_EQUAL)
def test_zero_when_student_equals_teacher(name, opts):
    out = build_loss(name, SAME, **opts)(_full_inputs(SAME, same=True))
    assert out.item() == pytest.approx(0.0, abs=1e-12)


ALL = ZERO_WHEN_EQUAL + [("cirkd", {"variant": "both", "pixel_queue": 8, "region_queue": 4,
                                     "pixel_update": 4})]


@pytest.mark.parametrize("name, opts", ALL)
def test_gradient_reaches_student_and_loss_parameters_only(name, opts):
    loss = build_loss(name, CTX, **opts).double()
    inputs = _full_inputs(CTX)
    out = loss(inputs)
    assert out.ndim == 0 and out.dtype == F64
    out.backward()
    used = inputs.student_decoder if loss.needs_features else inputs.student_logits
    assert used.grad.abs().sum() > 0
    assert inputs.teacher_logits.grad is None and inputs.teacher_decoder.grad is None
    for p in loss.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0


@pytest.mark.parametrize("name, opts", ALL)
def test_fp32_under_bf16_autocast(name, opts):
    loss = build_loss(name, CTX, **{k: v for k, v in opts.items()})
    inputs = _full_inputs(CTX, grad=False, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = loss(inputs)
    assert out.dtype == torch.float32 and torch.isfinite(out)


def test_as_float_keeps_fp32_and_fp64():
    for dtype, want in ((torch.float16, torch.float32), (torch.bfloat16, torch.float32),
                        (torch.float32, torch.float32), (F64, F64)):
        assert as_float(torch.zeros(1, dtype=dtype)).dtype == want


def test_baselines_compose_with_kd():
    losses = build_losses("kd+cwd+skd", ctx=CTX)
    assert list(losses) == ["kd", "cwd", "skd"] and losses["cwd"][1] == 3.0
    losses = build_losses("cwd+cirkd+bpkd", {"cwd": {"on": "decoder", "weight": 1.5},
                                             "cirkd": {"variant": "minibatch"}}, ctx=CTX)
    assert losses["cwd"][1] == 1.5 and losses["bpkd"][1] == 1.0
    inputs = _full_inputs(CTX)
    total = sum(w * m.double()(inputs) for m, w in losses.values())
    assert torch.isfinite(total)
    total.backward()


@pytest.mark.parametrize("name, opts, match", [
    ("cwd", {"tau": 0}, "'tau' must be a positive number"),
    ("cwd", {"on": "features"}, "'on' must be one of logits, decoder"),
    ("cwd", {"on": "decoder", "logit_stride": 4}, "applies to on='logits' only"),
    ("cwd", {"logit_stride": 0}, "'logit_stride' must be a positive integer"),
    ("skd", {"mode": "grid"}, "'mode' must be one of scale, window"),
    ("skd", {"pool_scale": 1.5}, "must be in \\(0, 1\\]"),
    ("skd", {"window": 2}, "applies to mode='window' only"),
    ("cirkd", {"variant": "all"}, "'variant' must be one of minibatch, memory, both"),
    ("cirkd", {"mb_weight": -1}, "'mb_weight' must be a number >= 0"),
    ("cirkd", {"pixel_update": 30, "pixel_queue": 20}, "exceeds 'pixel_queue'"),
    ("cirkd", {"chunk": -1}, "'chunk' must be an integer >= 0"),
    ("cirkd", {"pool": "yes"}, "'pool' must be true or false"),
    ("cirkd", {"pool": True, "variant": "memory"}, "pools the minibatch term only"),
    ("bpkd", {"trimap": 6}, "'trimap' must be odd"),
    ("bpkd", {"tau": -1.0}, "'tau' must be a positive number"),
])
def test_bad_options_are_one_line_user_errors(name, opts, match):
    with pytest.raises(BckdError, match=f"distillation method '{name}': .*{match}"):
        build_loss(name, CTX, **opts)


@pytest.mark.parametrize("name", ["skd", "cirkd"])
def test_feature_losses_say_what_is_missing(name):
    z = _randn(1, 3, 8, 8)
    with pytest.raises(ValueError, match=f"method '{name}' needs the student's decoder features"):
        build_loss(name, CTX)(_inputs(z, z))
