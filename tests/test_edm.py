"""The shared EDM core: network shapes, the official-pickle loader, preconditioning, the Heun
sampler against exact ground truth, and the FID arithmetic."""
import collections, math, os, pickle, sys, types
import numpy as np
import pytest
import scipy.linalg
import torch
import dmd
from conftest import exact_denoiser, fake_extractor, make_fake_cifar

def test_parameter_counts_and_official_names():
    for label_dim, n in [(0, 55_733_891), (10, 55_735_299)]:
        net = dmd.EDMPrecond(label_dim=label_dim)
        assert sum(p.numel() for p in net.parameters()) == n
    sd = net.state_dict()
    assert len(sd) == 427                                  # 425 unconditional + map_label.{weight,bias}
    expect = {'model.map_label.weight': (128, 10), 'model.map_augment.weight': (128, 9), 'model.map_layer0.weight': (512, 128),
              'model.map_layer1.bias': (512,), 'model.enc.32x32_conv.weight': (128, 3, 3, 3), 'model.enc.32x32_block0.conv0.weight': (256, 128, 3, 3),
              'model.enc.16x16_down.conv0.resample_filter': (1, 1, 2, 2), 'model.enc.16x16_block0.qkv.weight': (768, 256, 1, 1),
              'model.enc.8x8_block3.norm1.weight': (256,), 'model.dec.8x8_in0.proj.weight': (256, 256, 1, 1),
              'model.dec.16x16_up.skip.resample_filter': (1, 1, 2, 2), 'model.dec.16x16_block4.qkv.weight': (768, 256, 1, 1),
              'model.dec.32x32_block0.skip.weight': (256, 512, 1, 1), 'model.dec.32x32_aux_norm.weight': (256,),
              'model.dec.32x32_aux_conv.weight': (3, 256, 3, 3)}
    for k, shape in expect.items():
        assert tuple(sd[k].shape) == shape, k
    assert sum('resample_filter' in k for k in sd) == 8
    assert not any('attn' in k or 'map_noise' in k for k in sd)

def test_preconditioning_is_edm_table_1():
    sigma, sd = torch.tensor([0.002, 0.1, 0.5, 1.0, 80.0]), 0.5
    c_skip, c_out, c_in, c_noise = dmd.edm_precond(sigma, sd)
    for s, a, b, c, d in zip(sigma.tolist(), c_skip, c_out, c_in, c_noise):
        assert math.isclose(a, sd ** 2 / (s ** 2 + sd ** 2), rel_tol=1e-6)
        assert math.isclose(b, s * sd / math.sqrt(s ** 2 + sd ** 2), rel_tol=1e-6)
        assert math.isclose(c, 1 / math.sqrt(s ** 2 + sd ** 2), rel_tol=1e-6)
        assert math.isclose(d, math.log(s) / 4, rel_tol=1e-6)

def test_denoiser_is_identity_as_sigma_goes_to_zero():
    torch.manual_seed(0)
    net = dmd.EDMPrecond(model_channels=16)
    for p in net.parameters(): p.data += 0.05 * torch.randn_like(p)   # make the zero-init layers non-trivial
    x = torch.randn(2, 3, 32, 32)
    errs = [(net(x, s) - x).abs().max().item() for s in (1e-2, 1e-4, 1e-6)]
    assert errs[0] > 1e-4 and errs[2] < 1e-5 and errs[0] > errs[1] > errs[2]


def test_encoder_only_features_skip_the_decoder():
    """return_features='only' (the discriminators of dibregman/gan_only) gives the full pass's bottleneck features, runs
    no decoder (fewer FLOPs, no decoder gradients), and still gives input gradients (R1, the generator's GAN term)."""
    from torch.utils.flop_counter import FlopCounterMode
    torch.manual_seed(0)
    net = dmd.EDMPrecond(model_channels=16).eval()                    # eval: no dropout, so both passes are comparable
    x, s = torch.randn(2, 3, 32, 32, requires_grad=True), torch.tensor([0.5, 5.0])
    with FlopCounterMode(display=False) as full: D, feat = net(x, s, return_features=True)
    with FlopCounterMode(display=False) as enc: D0, feat0 = net(x, s, return_features='only')
    assert D0 is None and torch.equal(feat, feat0) and feat0.shape == (2, 32, 8, 8)
    assert enc.get_total_flops() < 0.5 * full.get_total_flops()         # the decoder is the larger half of DDPM++
    feat0.mean().backward()
    assert x.grad.abs().sum() > 0 and all(p.grad is None for n, p in net.named_parameters() if '.dec.' in n)
# ---- a pickle in the format of EDM's training loop, built here --------------------------------
# EDM saves dict(ema=..., loss_fn=..., augment_pipe=..., dataset_kwargs=...) with pickle; its networks
# are "persistent" objects that pickle as torch_utils.persistence._reconstruct_persistent_obj(meta),
# meta holding the class's module source code, which EDM exec()s when loading. Our source raises.
EVIL_SRC = "raise RuntimeError('the source embedded in the pickle was executed')"

def _fake_edm_modules():
    persistence, util = types.ModuleType('torch_utils.persistence'), types.ModuleType('dnnlib.util')
    def _reconstruct_persistent_obj(meta):            # what EDM does: exec the embedded module source
        exec(compile(meta['module_src'], '<pickle>', 'exec'), {})
    _reconstruct_persistent_obj.__module__ = 'torch_utils.persistence'
    _reconstruct_persistent_obj.__qualname__ = '_reconstruct_persistent_obj'
    persistence._reconstruct_persistent_obj = _reconstruct_persistent_obj
    class EasyDict(dict): pass
    EasyDict.__module__, EasyDict.__qualname__ = 'dnnlib.util', 'EasyDict'
    util.EasyDict = EasyDict
    mods = {'torch_utils': types.ModuleType('torch_utils'), 'torch_utils.persistence': persistence,
            'dnnlib': types.ModuleType('dnnlib'), 'dnnlib.util': util}
    return mods

class _Persistent:
    def __init__(self, class_name, state): self.meta = dict(type='class', version=6, module_src=EVIL_SRC, class_name=class_name, state=state)
    def __reduce__(self): return (sys.modules['torch_utils.persistence']._reconstruct_persistent_obj, (self.meta,))

def _as_official(m, init_kwargs=None):
    state = {k: v for k, v in m.__dict__.items() if k != '_modules'}
    children = collections.OrderedDict((k, _as_official(c)) for k, c in m._modules.items())
    if isinstance(m, torch.nn.ModuleDict):                 # EDM keeps torch's own ModuleDict
        md = torch.nn.ModuleDict.__new__(torch.nn.ModuleDict); md.__dict__.update(state, _modules=children); return md
    state.update(_modules=children, _init_args=(), _init_kwargs=init_kwargs or {})
    return _Persistent(type(m).__name__, state)

def write_official_pickle(path, net, unet_kwargs, ema_class='EDMPrecond'):
    mods = _fake_edm_modules()
    old = {k: sys.modules.get(k) for k in mods}
    sys.modules.update(mods)
    try:
        ema = _as_official(net)
        ema.meta['class_name'] = ema_class
        ema.meta['state']['_modules']['model'].meta['state']['_init_kwargs'] = dict(
            unet_kwargs, img_resolution=32, in_channels=3, out_channels=3, label_dim=net.label_dim, embedding_type='positional',
            encoder_type='standard', decoder_type='standard', channel_mult_noise=1, resample_filter=[1, 1], channel_mult_emb=4)
        data = dict(ema=ema, loss_fn=_Persistent('EDMLoss', dict(P_mean=-1.2, P_std=1.2, sigma_data=0.5)),
                    augment_pipe=_Persistent('AugmentPipe', dict(p=0.12, xflip=1e8, yflip=1, scale=1, rotate_frac=0, aniso=1, translate_frac=1)),
                    dataset_kwargs=mods['dnnlib.util'].EasyDict(class_name='training.dataset.ImageFolderDataset', path='cifar10-32x32.zip', resolution=32, max_size=50000))
        with open(path, 'wb') as f: pickle.dump(data, f)
    finally:
        for k, v in old.items():
            if v is None: sys.modules.pop(k)
            else: sys.modules[k] = v

@pytest.mark.parametrize('label_dim', [0, 10])
def test_load_edm_reads_official_format_without_executing_it(tmp_path, label_dim):
    torch.manual_seed(label_dim)
    net = dmd.EDMPrecond(label_dim=label_dim, model_channels=16, dropout=0.13).eval()
    for p in net.parameters(): p.data += 0.05 * torch.randn_like(p)
    path = tmp_path / 'edm.pkl'
    write_official_pickle(path, net, dict(model_channels=16, augment_dim=9, channel_mult=[2, 2, 2], dropout=0.13))
    sys.modules.update(_fake_edm_modules())                  # a plain unpickler runs the embedded source ...
    try:
        with pytest.raises(RuntimeError, match='embedded in the pickle was executed'):
            pickle.load(open(path, 'rb'))
    finally:
        for k in ('torch_utils', 'torch_utils.persistence', 'dnnlib', 'dnnlib.util'): sys.modules.pop(k)
    loaded = dmd.load_edm(str(path))                          # ... load_edm does not, and gives the same network
    assert not loaded.training and loaded.label_dim == label_dim and loaded.sigma_data == 0.5
    x, sigma = torch.randn(3, 3, 32, 32), torch.tensor([0.01, 1.0, 50.0])
    c = torch.eye(10)[[1, 4, 7]] if label_dim else None
    assert torch.equal(loaded(x, sigma, c), net(x, sigma, c))

def test_load_edm_errors_name_the_file(tmp_path):
    with pytest.raises(SystemExit, match='not found'): dmd.load_edm(str(tmp_path / 'missing.pkl'))
    net = dmd.EDMPrecond(model_channels=16)
    good = tmp_path / 'good.pkl'; write_official_pickle(good, net, dict(model_channels=16))
    (tmp_path / 'truncated.pkl').write_bytes(good.read_bytes()[:5000])
    (tmp_path / 'other.pkl').write_bytes(pickle.dumps({'ema': [1, 2, 3]}))
    (tmp_path / 'evil.pkl').write_bytes(b"cos\nsystem\n(S'touch " + str(tmp_path / 'pwned').encode() + b"'\ntR.")
    write_official_pickle(tmp_path / 'unknown.pkl', net, dict(model_channels=16), ema_class='StyleGAN2Generator')
    for name, why in [('truncated.pkl', 'EOFError|UnpicklingError'), ('other.pkl', 'not an EDMPrecond'),
                      ('evil.pkl', 'refusing to load global os.system'), ('unknown.pkl', 'StyleGAN2Generator, not an EDMPrecond')]:
        with pytest.raises(SystemExit, match=f'{name} is not a usable EDM network .*({why}).*Delete it to re-download'):
            dmd.load_edm(str(tmp_path / name))
    assert not (tmp_path / 'pwned').exists()

def test_heun_sampler_with_exact_denoiser_reproduces_the_mixture():
    world = dmd.GaussianMixture2D()
    z = torch.randn(20000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert dmd.karras(torch.tensor(0.0, dtype=torch.float64)) == 80 and abs(dmd.karras(torch.tensor(1.0)) - 0.002) < 1e-6
    m = world.metrics(dmd.heun_sample(exact_denoiser(world), z))
    exact = world.metrics(world.sample(20000, torch.Generator().manual_seed(1)))
    assert m['mode_tv'] < 0.02 and m['precision'] > 0.97
    assert abs(m['nll'] - exact['nll']) < 0.1                  # the mixture's entropy, up to sampling error
    bad = world.metrics(dmd.heun_sample(exact_denoiser(world), z, steps=2))   # too few steps is visibly worse
    assert bad['precision'] < m['precision'] - 0.1

def test_exact_denoiser_is_the_posterior_mean():
    """The Tweedie denoiser of the tests against the closed form: E[x_0 | x] = sum_k p(k | x) (m_k + std^2 / (std^2 +
    sigma^2) (x - m_k)), with p(k | x) from the mixture's own noisy density; and a single mode's limit."""
    world, sigma = dmd.GaussianMixture2D(), 0.7
    x = torch.randn(50, 2, dtype=torch.float64) * 2
    var = world.std ** 2 + sigma ** 2
    log_joint = world.weights.log() - (x[:, None] - world.means).pow(2).sum(-1) / (2 * var)
    post = log_joint.softmax(1)
    closed = (post[:, :, None] * (world.means + world.std ** 2 / var * (x[:, None] - world.means))).sum(1)
    torch.testing.assert_close(exact_denoiser(world)(x, sigma), closed, rtol=1e-9, atol=1e-9)
    at_mode = exact_denoiser(world)(world.means[:1].clone(), 1e-3)     # a mean is (almost) its own denoised value
    torch.testing.assert_close(at_mode, world.means[:1], atol=1e-4, rtol=0)

def test_fid_is_the_frechet_distance_of_the_features(tmp_path):
    """fid() on features from the injected extractor equals ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) computed
    here with scipy on the same features, in both modes."""
    g = torch.Generator().manual_seed(0)
    real = torch.randint(0, 256, (300, 3, 32, 32), dtype=torch.uint8, generator=g)
    fake = (real.float() * 0.7 + 40).clamp(0, 255).to(torch.uint8)
    out = dmd.fid([fake[:150], fake[150:]], fake_extractor, str(tmp_path / 'ref_{mode}.npz'), lambda: real.split(100))
    for mode, key in (('legacy_tensorflow', 'fid_legacy'), ('clean', 'fid_clean')):
        f1, f2 = fake_extractor(fake, mode).astype(np.float64), fake_extractor(real, mode).astype(np.float64)
        s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
        ref = ((f1.mean(0) - f2.mean(0)) ** 2).sum() + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
        assert math.isclose(out[key], ref, rel_tol=1e-5) and ref > 1e-3, (mode, out[key], ref)

def test_fid_path_on_synthetic_images(tmp_path):
    images, labels = dmd.load_cifar10(make_fake_cifar(tmp_path))
    assert images.shape == (200, 3, 32, 32) and images.dtype == torch.uint8 and labels.shape == (200,)
    real = lambda: images.split(50)
    same = dmd.fid(list(images.split(50)), fake_extractor, str(tmp_path / 'ref_{mode}.npz'), real)
    noise = dmd.fid([torch.randint(0, 256, (200, 3, 32, 32), dtype=torch.uint8)], fake_extractor, str(tmp_path / 'ref_{mode}.npz'), real)
    assert set(same) == {'fid_legacy', 'fid_clean'} and os.path.exists(tmp_path / 'ref_clean.npz')
    assert abs(same['fid_legacy']) < 1e-6 and noise['fid_legacy'] > 0.05 and noise['fid_clean'] > 0.05

# ---- FID's feature extractor through a stand-in for clean-fid's TorchScript Inception -----------------------
# The official inception-2015-12-05.pt is a TorchScript module: forward(img, return_features) takes images in [0, 255]
# (uint8 is fine), resizes them to 299 x 299 itself (bilinear) and normalises them; its `layers` module takes an already
# normalised 299 x 299 batch. The stand-in has that interface, and features that record what it was fed.

class StandInLayers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(3 * 8 * 8, 2042, bias=False)
    def forward(self, x):   # (N, 3, 299, 299) normalised -> (N, 2048, 1, 1), as pool3
        n = x.shape[0]
        seen = torch.stack([x.amin((1, 2, 3)), x.amax((1, 2, 3)), torch.full([n], float(x.shape[2])),
                            torch.full([n], float(x.shape[3])), torch.zeros(n), torch.zeros(n)], 1)
        return torch.cat([seen, self.proj(torch.nn.functional.adaptive_avg_pool2d(x, 8).flatten(1))], 1)[:, :, None, None]

class StandInInception(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = StandInLayers()
    def forward(self, img, return_features: bool = False):
        uint8 = float(img.dtype == torch.uint8)
        x = img.to(torch.float32)
        if x.shape[2] != 299 or x.shape[3] != 299:
            x = torch.nn.functional.interpolate(x, size=(299, 299), mode='bilinear', align_corners=False)
        f = self.layers((x - 128) / 128).reshape(x.shape[0], 2048)
        f = torch.cat([f[:, :4], torch.ones_like(f[:, :1]), torch.full_like(f[:, :1], uint8), f[:, 6:]], 1)
        return f if return_features else f[:, :1008]

def test_clean_fid_extractor_through_a_stand_in_inception(tmp_path, monkeypatch):
    """clean_fid_extractor and fid() end to end, offline: the stand-in is written under the official file name into the
    cache, so no download happens. 'legacy_tensorflow' hands the uint8 32 x 32 images to the network, which resizes
    them; 'clean' resizes them with PIL bicubic in float first (clean-fid's resizer) and feeds `layers` the normalised
    299 x 299 batch. Both: float32 (N, 2048) on the host, layers' input in [-1, 1]; a constant image gives the same
    features in both modes; the clean mode equals PIL's bicubic resize done here; fid() of two constant sets is the
    squared distance of their features, of a set against itself 0, and the reference statistics are the features'."""
    from PIL import Image
    monkeypatch.setenv('DISTILL_CACHE', str(tmp_path))
    torch.manual_seed(0)
    net = torch.jit.script(StandInInception().eval())
    net.save(str(tmp_path / 'inception-2015-12-05.pt'))
    monkeypatch.setattr(dmd.torch.hub, 'download_url_to_file', lambda *a, **k: pytest.fail('a download was tried'))
    extract = dmd.clean_fid_extractor(torch.device('cpu'))
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=g)
    legacy, clean = extract(x, 'legacy_tensorflow'), extract(x, 'clean')
    for f, resized_inside in ((legacy, 1.0), (clean, 0.0)):
        assert isinstance(f, np.ndarray) and f.shape == (6, 2048) and f.dtype == np.float32
        assert (f[:, 0] >= -1).all() and (f[:, 1] <= 1).all() and (f[:, 1] - f[:, 0] > 1).all()   # [-1, 1], not [0, 255]
        assert (f[:, 2:4] == 299).all() and (f[:, 4] == resized_inside).all() and (f[:, 5] == resized_inside).all()
    assert np.abs(legacy[:, 6:] - clean[:, 6:]).max() > 1e-3              # bilinear inside against bicubic first
    channels = [np.asarray(Image.fromarray(c.numpy().astype(np.float32), mode='F').resize((299, 299), Image.BICUBIC))
                for c in x[0]]                                             # clean: PIL bicubic in float, clipped
    want = net.layers((torch.from_numpy(np.stack(channels)).clamp(0, 255)[None] - 128) / 128).flatten()
    np.testing.assert_allclose(clean[0, 6:], want[6:].detach().numpy(), rtol=1e-4, atol=1e-5)
    flat = torch.full((1, 3, 32, 32), 200, dtype=torch.uint8)              # a constant image: the same in both modes
    np.testing.assert_allclose(extract(flat, 'legacy_tensorflow')[0, 6:], extract(flat, 'clean')[0, 6:], atol=1e-5)
    np.testing.assert_allclose(extract(flat, 'clean')[0, :2], [72 / 128] * 2, atol=1e-5)
    # fid() end to end on these features. Its arithmetic on 2048-d features is scipy's sqrtm, 15 s a call on a 2-core
    # CPU; test_fid_is_the_frechet_distance_of_the_features checks it with clean-fid's own function, so here an exact
    # eigh-based Frechet distance stands in for it.
    import cleanfid.fid
    monkeypatch.setattr(cleanfid.fid, 'frechet_distance', frechet_by_eigh)
    a, b = torch.full((20, 3, 32, 32), 30, dtype=torch.uint8), torch.full((20, 3, 32, 32), 220, dtype=torch.uint8)
    out = dmd.fid([b[:7], b[7:]], extract, str(tmp_path / 'ref_{mode}.npz'), lambda: a.split(8))
    for mode, key in (('legacy_tensorflow', 'fid_legacy'), ('clean', 'fid_clean')):     # constant sets: no covariance,
        want = ((extract(a[:1], mode) - extract(b[:1], mode)).astype(np.float64) ** 2).sum()   # FID = |mu_a - mu_b|^2
        assert want > 1 and math.isclose(out[key], want, rel_tol=1e-4), (mode, out[key], want)
        ref = np.load(tmp_path / f'ref_{mode}.npz')                          # the cached reference statistics
        np.testing.assert_allclose(ref['mu'], extract(a[:1], mode)[0], rtol=1e-5, atol=1e-6)
    x2 = torch.randint(0, 256, (30, 3, 32, 32), dtype=torch.uint8, generator=g)
    same = dmd.fid([x2[:10], x2[10:]], extract, str(tmp_path / 'x2_{mode}.npz'), lambda: x2.split(16))
    assert abs(same['fid_legacy']) < 1e-4 and abs(same['fid_clean']) < 1e-4         # round-off of 2048-d float32

def frechet_by_eigh(mu1, sigma1, mu2, sigma2):
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)), the trace of the root as that of (S1^(1/2) S2 S1^(1/2))^(1/2)."""
    e, v = np.linalg.eigh(sigma1)
    root1 = (v * np.sqrt(e.clip(0))) @ v.T
    cross = np.sqrt(np.linalg.eigvalsh(root1 @ sigma2 @ root1).clip(0)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * cross)

def test_load_edm_state_dict_mismatch_is_one_line(tmp_path):
    """A pickle whose weights do not fit the network its own settings describe (here: the settings say 32 channels,
    the weights have 16) fails strict loading; torch's message spans lines, the error is one."""
    net = dmd.EDMPrecond(model_channels=16)
    path = tmp_path / 'mismatch.pkl'
    write_official_pickle(path, net, dict(model_channels=32))
    with pytest.raises(SystemExit) as e:
        dmd.load_edm(str(path))
    msg = str(e.value)
    assert '\n' not in msg and '\t' not in msg and msg.startswith(f'error: {path} is not a usable EDM network (Runtime')
    assert 'size mismatch' in msg and msg.endswith('Delete it to re-download, or pass another --teacher.')
