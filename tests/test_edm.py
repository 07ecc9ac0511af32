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
