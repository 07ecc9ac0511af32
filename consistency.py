"""
consistency.py -- Consistency distillation (CD) and training (CT, iCT-style) of the EDM CIFAR-10 teacher, one or few steps.

A consistency model f_theta(x, sigma) maps every point of a probability-flow ODE trajectory to its end at sigma_min;
it is the teacher's network wrapped so that f(x, sigma_min) = x exactly. CD: from x = x0 + t_{n+1} z, one Heun step
of the frozen teacher gives x_hat at t_n, and f_theta(x, t_{n+1}) is pulled to f_theta-(x_hat, t_n). CT needs no
teacher: x_hat = x0 + t_n z with the same z, theta- = theta, a doubling number of levels N, pseudo-Huber (iCT).
Papers: Song et al., "Consistency Models", ICML 2023 (CD, Table 3); Song & Dhariwal, ICLR 2024 (iCT); equations: seed 003 sections 1-3.

    python consistency.py --data toy                 # CD on the 2-D mixture on a CPU, about a minute (--mode ct: CT)
    python consistency.py                            # CD, CIFAR-10 uncond on one H100 (--mode ct --cond: iCT-style, cond)
    python consistency.py --out R --eval-only --sample-steps 2   # 2-step FID of run R's G_ema, samples in R/eval_2step
Expected: toy CD mode_tv 0.026, precision 0.75 in 31 s on 2 CPU cores, 2 steps no worse. CIFAR-10, published FID: CD
(LPIPS) 3.55 / 2.93 (1 / 2 steps), iCT 2.83; ours and the H100 time not yet measured (README; --bench 20 times a step).

code: G = Consistency: f_theta = c_skip x + c_out F_theta, c_skip = s_d^2/((s - s_min)^2 + s_d^2), c_out = (s - s_min) s_d/sqrt(s^2 + s_d^2);
G_target, --mu: theta- = sg(mu theta- + (1 - mu) theta), mu = 0: sg(theta) (Table 3, CIFAR-10 CD), CT: theta- = theta; teacher: phi;
t_hi > t_lo: t_{n+1} > t_n, adjacent on the N-level Karras grid; heun_step: x_hat; multistep: K-step sampling (--sample-steps).

Changes relative to dmd.py: no fake denoiser or anchor; real data; G wraps the teacher; K-step sampler. Departures: no
LPIPS (CD's metric; VGG weights, one more pass per step at 224x224); L2 costs FID (CM, Fig. 3), pseudo-Huber is iCT's remedy. Both losses weight by 1/(t_{n+1} - t_n) (iCT; CM's CD:
1, with which high-sigma errors degrade the low-sigma map: toy precision 0.32 vs 0.66). CT starts from the teacher like
ECT (iCT: from scratch, dropout 0.3); no dropout; Adam, not RAdam; toy CT: n uniform (CM), N <= 81; CIFAR-10 defaults ours.
"""
import argparse, collections, contextlib, copy, inspect, io, json, math, os, pickle, random, resource, signal, time
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

# -----------------------------------------------------------------------------
# Config: shared flags from add_shared_args(), then the consistency flags; defaults that differ by --data in DEFAULTS.

DEFAULTS = {'cifar10': dict(kimg=50000, batch=512, lr=1e-4, ema_kimg=500, eval_every=2000, log_every=100, ct_scales=[10, 1280], ct_noise='lognormal'),
            'toy': dict(kimg=600, batch=256, lr=1e-3, ema_kimg=5, eval_every=200, log_every=200, ct_scales=[10, 80], ct_noise='uniform')}

def get_config(argv=None):
    p = argparse.ArgumentParser(prog=os.path.basename(__file__), description='Consistency distillation / training of an EDM teacher.', formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_shared_args(p)
    g = p.add_argument_group('consistency')
    g.add_argument('--mode', choices=['cd', 'ct'], default='cd', help='cd: distil the teacher (Heun step, target theta-); ct: teacher-free (iCT)')
    g.add_argument('--loss', choices=['l2', 'huber'], help='metric d: squared L2 or pseudo-Huber, Eq. (43) (default: l2 for cd, huber for ct)')
    g.add_argument('--huber-c', type=pos_float, help='pseudo-Huber c (default 0.00054 sqrt(dim), iCT)')
    g.add_argument('--scales', type=_typed(int, lambda v: v >= 2, 'an integer >= 2'), default=18, help='cd: N, levels of the Karras grid (Table 3: 18)')
    g.add_argument('--ct-scales', type=pos_int, nargs=2, metavar=('S0', 'S1'), help='ct: N doubles from S0 + 1 to S1 + 1 levels over training (iCT: 10 1280)')
    g.add_argument('--ct-noise', choices=['lognormal', 'uniform'], help='ct: draw n with the lognormal mass of its interval (iCT) or uniformly (CM)')
    g.add_argument('--mu', type=_typed(float, lambda v: 0 <= v < 1, 'in [0, 1)'), default=0.0, help='cd: EMA rate of the target theta- (0: sg(theta))')
    g.add_argument('--sample-steps', type=pos_int, default=1, help='sampling steps in evaluation; > 1: multistep with re-noising')
    g.add_argument('--mid-sigma', type=_typed(float, lambda v: 0.002 < v < 80, 'in (0.002, 80)'), default=0.821, help='first re-noising sigma (iCT: 0.821)')
    g.add_argument('--eval-only', action='store_true', help='evaluate the G_ema of the run in --out with --sample-steps and exit')
    cfg = finish_config(p, argv, DEFAULTS)
    cfg.loss = cfg.loss or ('huber' if cfg.mode == 'ct' else 'l2')
    return cfg

# === BEGIN SHARED: EDM network ===
# A compact DDPM++ SongUNet with EDM preconditioning (Karras et al. 2022, Table 1), whose names follow the official
# pickles so their weights load strictly; only the DDPM++ path of EDM's SongUNet is kept.

def xavier(shape, gain=1.0):   # EDM's xavier_uniform init, times gain (1e-5 for its "init_zero" layers)
    rf = math.prod(shape[2:])
    return nn.Parameter(gain * math.sqrt(6 / ((shape[0] + shape[1]) * rf)) * (torch.rand(shape) * 2 - 1))

class Linear(nn.Module):
    def __init__(self, fin, fout, bias=True):
        super().__init__()
        self.weight, self.bias = xavier([fout, fin]), nn.Parameter(torch.zeros(fout)) if bias else None
    def forward(self, x): return F.linear(x, self.weight, self.bias)

class Conv2d(nn.Module):
    def __init__(self, cin, cout, kernel, up=False, down=False, gain=1.0):
        super().__init__()
        self.up, self.down = up, down
        self.weight = xavier([cout, cin, kernel, kernel], gain) if kernel else None
        self.bias = nn.Parameter(torch.zeros(cout)) if kernel else None
        # EDM stores its 2x2 box filter as a buffer; kept so that state_dicts match. Resampling with
        # it equals nearest-neighbour upsampling and 2x2 average pooling, which is what we run.
        self.register_buffer('resample_filter', torch.full([1, 1, 2, 2], 0.25) if up or down else None)
    def forward(self, x):
        if self.up: x = F.interpolate(x, scale_factor=2, mode='nearest')
        if self.down: x = F.avg_pool2d(x, 2)
        return F.conv2d(x, self.weight, self.bias, padding=self.weight.shape[-1] // 2) if self.weight is not None else x

def GroupNorm(c): return nn.GroupNorm(min(32, c // 4), c, eps=1e-6)

class UNetBlock(nn.Module):
    """Residual block, optionally resampling, optionally followed by one-head self-attention."""
    def __init__(self, cin, cout, emb, up=False, down=False, attention=False, dropout=0.0):
        super().__init__()
        self.in_channels, self.out_channels, self.dropout, self.attention = cin, cout, dropout, attention
        self.norm0, self.conv0 = GroupNorm(cin), Conv2d(cin, cout, 3, up=up, down=down)
        self.affine, self.norm1, self.conv1 = Linear(emb, cout), GroupNorm(cout), Conv2d(cout, cout, 3, gain=1e-5)
        self.skip = Conv2d(cin, cout, 1, up=up, down=down) if cin != cout or up or down else None
        if attention:
            self.norm2, self.qkv, self.proj = GroupNorm(cout), Conv2d(cout, 3 * cout, 1, gain=math.sqrt(0.2)), Conv2d(cout, cout, 1, gain=1e-5)

    def forward(self, x, emb):
        h = self.conv0(F.silu(self.norm0(x)))
        h = F.silu(self.norm1(h + self.affine(emb)[:, :, None, None]))
        h = self.conv1(F.dropout(h, self.dropout, self.training))
        x = (h + (self.skip(x) if self.skip is not None else x)) * math.sqrt(0.5)
        if self.attention:
            B, C, H, W = x.shape
            q, k, v = self.qkv(self.norm2(x)).reshape(B, C, 3, H * W).transpose(1, 3).unbind(2)  # (B, HW, C) each
            a = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]        # softmax(q k^T / sqrt C) v
            x = (self.proj(a.transpose(1, 2).reshape(B, C, H, W)) + x) * math.sqrt(0.5)
        return x

class SongUNet(nn.Module):
    """DDPM++ U-Net F(x, c_noise). Defaults are EDM's CIFAR-10 configuration (55.7M parameters)."""
    def __init__(self, img_resolution=32, in_channels=3, out_channels=3, label_dim=0, augment_dim=9,
                 model_channels=128, channel_mult=(2, 2, 2), num_blocks=4, attn_resolutions=(16,), dropout=0.13):
        super().__init__()
        emb, mc = 4 * model_channels, model_channels
        self.map_label = Linear(label_dim, mc) if label_dim else None
        self.map_augment = Linear(augment_dim, mc, bias=False) if augment_dim else None
        self.map_layer0, self.map_layer1 = Linear(mc, emb), Linear(emb, emb)
        self.enc, skips, c = nn.ModuleDict(), [], in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0: self.enc[f'{res}x{res}_conv'], c = Conv2d(c, mc, 3), mc
            else: self.enc[f'{res}x{res}_down'] = UNetBlock(c, c, emb, down=True, dropout=dropout)
            skips.append(c)
            for i in range(num_blocks):
                self.enc[f'{res}x{res}_block{i}'] = UNetBlock(c, mc * mult, emb, attention=res in attn_resolutions, dropout=dropout)
                c = mc * mult; skips.append(c)
        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f'{res}x{res}_in0'] = UNetBlock(c, c, emb, attention=True, dropout=dropout)
                self.dec[f'{res}x{res}_in1'] = UNetBlock(c, c, emb, dropout=dropout)
            else:
                self.dec[f'{res}x{res}_up'] = UNetBlock(c, c, emb, up=True, dropout=dropout)
            for i in range(num_blocks + 1):
                self.dec[f'{res}x{res}_block{i}'] = UNetBlock(c + skips.pop(), mc * mult, emb,
                                                               attention=i == num_blocks and res in attn_resolutions, dropout=dropout)
                c = mc * mult
        self.dec[f'{img_resolution}x{img_resolution}_aux_norm'] = GroupNorm(c)
        self.dec[f'{img_resolution}x{img_resolution}_aux_conv'] = Conv2d(c, out_channels, 3, gain=1e-5)

    def forward(self, x, c_noise, class_labels=None, decode=True):
        half = self.map_layer0.weight.shape[1] // 2                      # positional embedding of c_noise
        emb = torch.outer(c_noise.float(), (1 / 10000) ** (torch.arange(half, device=x.device) / (half - 1)))
        emb = torch.cat([emb.sin(), emb.cos()], dim=1)                   # (B, model_channels)
        if self.map_label is not None:
            emb = emb + self.map_label(class_labels * math.sqrt(self.map_label.weight.shape[1]))
        emb = F.silu(self.map_layer1(F.silu(self.map_layer0(emb))))    # (B, 4 * model_channels)
        skips = []
        for block in self.enc.values():
            x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
            skips.append(x)
        feat = x                                                         # encoder bottleneck, (B, 256, 8, 8) on CIFAR-10
        if not decode: return None, feat                                 # a discriminator on the encoder needs no decoder
        blocks = list(self.dec.values())
        for block in blocks[:-2]:
            if x.shape[1] != block.in_channels:
                x = torch.cat([x, skips.pop()], dim=1)
            x = block(x, emb)
        return blocks[-1](F.silu(blocks[-2](x))), feat

def edm_precond(sigma, sigma_data):
    """EDM Table 1: D(x, sigma) = c_skip x + c_out F(c_in x, c_noise); returns c_skip, c_out, c_in, c_noise."""
    s2 = sigma ** 2 + sigma_data ** 2
    return sigma_data ** 2 / s2, sigma * sigma_data / s2.sqrt(), 1 / s2.sqrt(), sigma.log() / 4

def as_sigma(sigma, x):
    """sigma as a float32 tensor broadcastable against x: (B, 1, ..., 1). A Python number becomes a
    fill on the device, not a host-to-device copy (which would make the CPU wait for the GPU)."""
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    if not torch.is_tensor(sigma): return torch.full(shape, float(sigma), device=x.device)
    return sigma.to(x.device, torch.float32).reshape(-1, *shape[1:]).expand(shape)

class EDMPrecond(nn.Module):
    """The denoiser D(x, sigma) of EDM. Preconditioning and the output combination run in fp32."""
    def __init__(self, label_dim=0, sigma_data=0.5, **unet_kwargs):
        super().__init__()
        self.kwargs = dict(label_dim=label_dim, sigma_data=sigma_data, **unet_kwargs)   # saved with .pt weights
        self.label_dim, self.sigma_data, self.model = label_dim, sigma_data, SongUNet(label_dim=label_dim, **unet_kwargs)

    def forward(self, x, sigma, class_labels=None, return_features=False):   # return_features='only': (None, feat), no decoder
        x, sigma = x.float(), as_sigma(sigma, x)
        c_skip, c_out, c_in, c_noise = edm_precond(sigma, self.sigma_data)
        if self.label_dim and class_labels is None: class_labels = torch.zeros(x.shape[0], self.label_dim, device=x.device)
        F_x, feat = self.model(c_in * x, c_noise.flatten(), class_labels, decode=return_features != 'only')
        D_x = None if F_x is None else c_skip * x + c_out * F_x.float()
        return (D_x, feat.float()) if return_features else D_x

# === END SHARED: EDM network ===

# === BEGIN SHARED: EDM teacher ===
# load_edm(source): the official pickle (URL or file) or our .pt, read without EDM's code;
# heun_sample: EDM Algorithm 2; sample_sigma / edm_loss: the noise levels and denoising loss.

EDM_URL = 'https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/'
EDM_UNCOND, EDM_COND = EDM_URL + 'edm-cifar10-32x32-uncond-vp.pkl', EDM_URL + 'edm-cifar10-32x32-cond-vp.pkl'
SIGMA_MIN, SIGMA_MAX, RHO = 0.002, 80.0, 7.0

def cache_dir():   # downloads, the toy teacher, teacher pairs; DISTILL_CACHE overrides
    d = os.environ.get('DISTILL_CACHE', os.path.join(os.path.expanduser('~'), '.cache', 'distill'))
    os.makedirs(d, exist_ok=True); return d

def download(url, dst):
    """url -> dst with a progress bar, via a temp file and a rename (a broken transfer leaves nothing)."""
    if not os.path.exists(dst):
        try: torch.hub.download_url_to_file(url, dst, progress=True)
        except Exception as e: raise SystemExit(f'error: could not download {url} ({e}). Download it by hand and put it at {dst}')
    return dst

class _Stub:
    """Stands in for a class from the official pickle: keeps its name and state, runs nothing."""
    def __init__(self, class_name='?', state=None): self.class_name, self.state = class_name, state or {}
    def __setstate__(self, state): self.state = state

class _SafeUnpickler(pickle.Unpickler):
    """Unpickles EDM's network pickles without dnnlib/torch_utils: persistent objects become _Stubs,
    tensors are rebuilt by torch's weights-only loader, and any other global is refused."""
    ALLOWED = {('collections', 'OrderedDict'): collections.OrderedDict, ('torch._utils', '_rebuild_tensor_v2'): torch._utils._rebuild_tensor_v2,
               ('torch._utils', '_rebuild_parameter'): torch._utils._rebuild_parameter,
               ('torch.storage', '_load_from_bytes'): lambda b: torch.load(io.BytesIO(b), weights_only=True),
               # EDM's persistence would exec() the module source stored in the pickle; we keep only name and state
               ('torch_utils.persistence', '_reconstruct_persistent_obj'): lambda meta: _Stub(meta['class_name'], meta['state']),
               ('dnnlib.util', 'EasyDict'): dict, ('numpy', 'dtype'): np.dtype,
               **{(m, 'scalar'): lambda dt, b: np.frombuffer(b, dt)[0] for m in ('numpy.core.multiarray', 'numpy._core.multiarray')},
               ('builtins', 'set'): set, ('__builtin__', 'set'): set, ('_codecs', 'encode'): lambda s, enc: s.encode(enc)}
    def find_class(self, module, name):
        if (module, name) in self.ALLOWED: return self.ALLOWED[module, name]
        if module.startswith('torch.nn.modules.'): return _Stub                      # ModuleDict & co.
        if module == 'torch' and isinstance(getattr(torch, name, None), torch.dtype): return getattr(torch, name)
        raise pickle.UnpicklingError(f'refusing to load global {module}.{name}')

def _stub_state_dict(stub, prefix=''):
    st = stub.state
    sd = {prefix + k: v for k, v in [*st.get('_parameters', {}).items(), *st.get('_buffers', {}).items()] if v is not None}
    for k, m in st.get('_modules', {}).items():
        if m is not None: sd.update(_stub_state_dict(m, prefix + k + '.'))
    return sd

def load_edm(source, device='cpu'):
    """EDMPrecond in eval mode from a URL, an official .pkl, or a .pt ({'kwargs', 'state_dict'})."""
    if source.startswith(('http://', 'https://')):
        source = download(source, os.path.join(cache_dir(), os.path.basename(source)))
    if not os.path.isfile(source):
        raise SystemExit(f'error: teacher file {source} not found; pass a URL, an EDM .pkl or a .pt (official: {EDM_UNCOND})')
    try:
        if source.endswith('.pt'):
            ckpt = torch.load(source, map_location='cpu', weights_only=True)
            kwargs, sd = ckpt.get('kwargs', {}), ckpt.get('state_dict', ckpt)
        else:
            with open(source, 'rb') as f: data = _SafeUnpickler(f).load()
            ema = data['ema'] if isinstance(data, dict) else None
            if not (isinstance(ema, _Stub) and ema.class_name == 'EDMPrecond'):
                raise ValueError(f"'ema' is {getattr(ema, 'class_name', type(ema).__name__)}, not an EDMPrecond")
            unet = ema.state['_modules']['model']
            if unet.class_name != 'SongUNet' or unet.state.get('_init_kwargs', {}).get('embedding_type', 'positional') != 'positional':
                raise ValueError('only the DDPM++ SongUNet (EDM\'s CIFAR-10 "vp" networks) is supported')
            kwargs = {k: v for k, v in unet.state.get('_init_kwargs', {}).items() if k in inspect.signature(SongUNet).parameters}
            kwargs.update(label_dim=int(ema.state['label_dim']), sigma_data=float(ema.state['sigma_data']))
            sd = _stub_state_dict(ema)
        net = EDMPrecond(**kwargs); net.load_state_dict(sd, strict=True)
    except (pickle.UnpicklingError, KeyError, ValueError, RuntimeError, EOFError, AttributeError, TypeError) as e:
        raise SystemExit(f'error: {source} is not a usable EDM network ({type(e).__name__}: {str(e)[:300]}). '
                         f'Delete it to re-download, or pass another --teacher.')
    return net.eval().requires_grad_(False).to(device)

def karras(u):
    """EDM Eq. (5): the noise level at position u in [0, 1] of the ramp from SIGMA_MAX to SIGMA_MIN."""
    return (SIGMA_MAX ** (1 / RHO) + u * (SIGMA_MIN ** (1 / RHO) - SIGMA_MAX ** (1 / RHO))) ** RHO

def karras_sigmas(n):   # sigma_0 > ... > sigma_{n-1}, then sigma_n = 0; float64
    return torch.cat([karras(torch.arange(n, dtype=torch.float64) / (n - 1)), torch.zeros(1, dtype=torch.float64)])

@torch.no_grad()
def heun_sample(net, z, class_labels=None, steps=18):
    """EDM Algorithm 2 (deterministic Heun, 2 * steps - 1 = 35 network evaluations)."""
    t = karras_sigmas(steps).to(z.device)
    x = z.to(torch.float64) * t[0]
    for i in range(steps):
        d = (x - net(x, t[i], class_labels).to(torch.float64)) / t[i]           # dx/dt = (x - D(x; t)) / t
        x_next = x + (t[i + 1] - t[i]) * d
        if t[i + 1] > 0:                                                         # 2nd-order correction
            d2 = (x_next - net(x_next, t[i + 1], class_labels).to(torch.float64)) / t[i + 1]
            x_next = x + (t[i + 1] - t[i]) * (d + d2) / 2
        x = x_next
    return x.float()

def sample_sigma(n, device, u_min=0.02, u_max=0.98):   # u ~ U[0.02, 0.98], as DMD's t ~ U[0.02 T, 0.98 T]
    return karras(torch.empty(n, device=device).uniform_(u_min, u_max))

def generate(G, z, c=None, sigma=SIGMA_MAX):
    """A one-step generator made from a denoiser: x = G_theta(z) = D_theta(sigma z, sigma)."""
    return G(z * sigma, sigma, c)

def edm_loss(net, x, sigma, class_labels=None):
    """EDM's denoising loss lambda(sigma) ||D(x + sigma n, sigma) - x||^2, lambda = 1/c_out^2."""
    sigma = as_sigma(sigma, x)
    D = net(x + sigma * torch.randn_like(x), sigma, class_labels)
    lam = (sigma ** 2 + net.sigma_data ** 2) / (sigma * net.sigma_data) ** 2
    return (lam * (D - x) ** 2).mean()

# === END SHARED: EDM teacher ===

# === BEGIN SHARED: toy world ===
# A 2-D Gaussian mixture with exact density, noisy score and denoiser: the CPU teaching mode and
# the ground truth for tests. The toy teacher is a small MLP with EDM preconditioning, trained
# by edm_loss and cached, so every method starts from teacher weights as on CIFAR-10.

class GaussianMixture2D:
    def __init__(self, k=8, radius=2.0, std=0.1):
        ang = torch.arange(k, dtype=torch.float64) * 2 * math.pi / k
        self.means, self.std = radius * torch.stack([ang.cos(), ang.sin()], 1), std     # (K, 2)
        self.weights = torch.arange(1, k + 1, dtype=torch.float64) / (k * (k + 1) / 2)  # unequal: 1 : 2 : ... : k
        self.sigma_data = float((self.weights @ self.means.pow(2)).mean() + std ** 2) ** 0.5

    def sample(self, n, generator=None):
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        return (self.means[k] + self.std * torch.randn(n, 2, dtype=torch.float64, generator=generator)).float()

    def _log_joint(self, x, sigma=0.0):   # log w_k N(x; m_k, (std^2 + sigma^2) I), (N, K)
        var = self.std ** 2 + torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1, 1) ** 2
        d2 = (x.double()[:, None, :] - self.means.to(x.device)).pow(2).sum(-1)
        return self.weights.to(x.device).log() - d2 / (2 * var) - torch.log(2 * math.pi * var)

    def log_prob(self, x, sigma=0.0): return self._log_joint(x, sigma).logsumexp(1)

    def denoise(self, x, sigma, class_labels=None):
        """Exact E[x_0 | x_0 + sigma n = x]; same call signature as a denoiser network."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1, 1).expand(x.shape[0], 1)
        post = self._log_joint(x, sigma).softmax(1)                          # p(k | x), (N, K)
        var = self.std ** 2 + sigma ** 2
        mk = self.means.to(x.device) + (self.std ** 2 / var)[:, :, None] * (x.double()[:, None] - self.means.to(x.device))
        return (post[:, :, None] * mk).sum(1).to(x.dtype)

    def metrics(self, x):
        """Exact quality of samples x (N, 2): mode_tv, precision (within 3 std of a mean), nll."""
        d = (x.double()[:, None, :] - self.means).norm(dim=-1)              # (N, K)
        freq = torch.bincount(d.argmin(1), minlength=len(self.weights)).double() / len(x)
        return dict(mode_tv=0.5 * (freq - self.weights).abs().sum().item(),
                    precision=(d.min(1).values < 3 * self.std).double().mean().item(),
                    nll=-self.log_prob(x).clamp_min(-1e4).mean().item())

class ToyDenoiser(nn.Module):
    """A 3x256 MLP F(c_in x, c_noise) with EDM preconditioning; the call signature of EDMPrecond."""
    def __init__(self, sigma_data=1.0, dim=2, width=256, depth=3, label_dim=0):
        super().__init__()
        self.kwargs, self.sigma_data, self.label_dim = dict(sigma_data=sigma_data, dim=dim, width=width, depth=depth), sigma_data, 0
        self.register_buffer('freqs', 2.0 ** torch.arange(8))                # Fourier features of c_noise
        self.inp, self.out = nn.Linear(dim + 16, width), nn.Linear(width, dim)
        self.hidden = nn.ModuleList(nn.Linear(width, width) for _ in range(depth - 1))

    def forward(self, x, sigma, class_labels=None, return_features=False):
        x, sigma = x.float(), as_sigma(sigma, x)
        c_skip, c_out, c_in, c_noise = edm_precond(sigma, self.sigma_data)
        e = c_noise * self.freqs                                           # (B, 8)
        h = F.silu(self.inp(torch.cat([c_in * x, e.sin(), e.cos()], 1)))
        for layer in self.hidden:
            h = F.silu(layer(h))                                           # (B, width): the features
        D_x = c_skip * x + c_out * self.out(h)
        return (D_x, h) if return_features else D_x

def toy_teacher(steps=3000, batch=1024, seed=0):
    """The toy teacher: ToyDenoiser trained with edm_loss (lognormal sigma, as EDM); cached on disk."""
    path = os.path.join(cache_dir(), f'toy_teacher_{steps}_{seed}.pt')
    world = GaussianMixture2D()
    if not os.path.exists(path):
        g = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            net = ToyDenoiser(world.sigma_data)
            opt = torch.optim.Adam(net.parameters(), lr=2e-3); sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=steps)
            for _ in tqdm(range(steps), desc='training the toy teacher (once, cached)', leave=False):
                sigma = (torch.randn(batch) * 1.2 - 1.2).exp()               # EDM: ln sigma ~ N(-1.2, 1.2^2)
                loss = edm_loss(net, world.sample(batch, g), sigma)
                opt.zero_grad(set_to_none=True); loss.backward(); opt.step(); sched.step()
        atomic_save({'kwargs': net.kwargs, 'state_dict': net.state_dict()}, path)
    ckpt = torch.load(path, weights_only=True)
    net = ToyDenoiser(**ckpt['kwargs']); net.load_state_dict(ckpt['state_dict'])
    return net.eval().requires_grad_(False)

def plot_toy(world, x, path, title=''):
    import matplotlib; matplotlib.use('Agg'); import matplotlib.pyplot as plt
    xx, yy = torch.meshgrid(torch.linspace(-3, 3, 200), torch.linspace(-3, 3, 200), indexing='xy')
    lp = world.log_prob(torch.stack([xx.flatten(), yy.flatten()], 1)).reshape(200, 200)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.contour(xx, yy, lp.clamp_min(-12), levels=12, cmap='Blues', linewidths=0.7)
    ax.scatter(x[:, 0], x[:, 1], s=1, c='tab:red', alpha=0.4)
    ax.set(xlim=(-3, 3), ylim=(-3, 3), aspect='equal', title=title)
    fig.tight_layout(); fig.savefig(path, dpi=120); plt.close(fig)

# === END SHARED: toy world ===

# === BEGIN SHARED: data and evaluation ===
# CIFAR-10 as one uint8 tensor on the device; FID in clean-fid's 'legacy_tensorflow' and 'clean'
# modes and Inception Score from the same network; sample grids and the metrics-vs-kimg plot.

CIFAR_URL = 'https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz'
INCEPTION_URL = 'https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt'
FID_MODES = ('legacy_tensorflow', 'clean')

def load_cifar10(root):
    """CIFAR-10 train as uint8 (50000, 3, 32, 32) and int64 labels; downloaded with torchvision."""
    folder = os.path.join(root, 'cifar-10-batches-py')
    if not os.path.isdir(folder):
        from torchvision.datasets.utils import download_and_extract_archive
        try: download_and_extract_archive(CIFAR_URL, root, md5='c58f30108f718f92721af3b95e74349a')
        except Exception as e: raise SystemExit(f'error: could not download CIFAR-10 ({e}). Put {CIFAR_URL} into {root} (it is extracted to {folder})')
    batches = [pickle.load(open(os.path.join(folder, f'data_batch_{i}'), 'rb'), encoding='latin1') for i in range(1, 6)]
    x = np.concatenate([np.asarray(b['data'], dtype=np.uint8).reshape(-1, 3, 32, 32) for b in batches])
    return torch.from_numpy(x), torch.tensor(sum((list(b['labels']) for b in batches), []))

def to_uint8(x): return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)

def frechet_distance(mu1, s1, mu2, s2):
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)); tr (S1 S2)^(1/2) from the eigenvalues of the
    symmetric PSD matrix S1^(1/2) S2 S1^(1/2), which has the same spectrum."""
    w, V = np.linalg.eigh(s1)
    r1 = (V * np.sqrt(w.clip(0))) @ V.T
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.linalg.eigvalsh(r1 @ s2 @ r1).clip(0)).sum())

def inception_score(probs, splits=10):   # exp E[KL(p(y|x) || p(y))], mean over 10 splits
    kl = lambda p: (p * (np.log(p + 1e-12) - np.log(p.mean(0, keepdims=True) + 1e-12))).sum(1).mean()
    return float(np.mean([np.exp(kl(p)) for p in np.array_split(probs, splits)]))

def clean_fid_extractor(device):
    """extract(uint8 (N, 3, H, W), mode) -> (2048-d pool3 features, 1008-way probabilities) with
    clean-fid's Inception: 'legacy_tensorflow' resizes inside the network as TF did, 'clean' with PIL
    bicubic first. Probabilities as the original IS: softmax of the output layer without bias."""
    from cleanfid.inception_torchscript import InceptionV3W
    from cleanfid.resize import build_resizer
    download(INCEPTION_URL, os.path.join(cache_dir(), 'inception-2015-12-05.pt'))
    nets = {m: InceptionV3W(cache_dir(), download=False, resize_inside=m == FID_MODES[0]).to(device).eval() for m in FID_MODES}
    resize = build_resizer('clean')
    def extract(x, mode):
        if mode == 'clean':
            x = torch.stack([torch.from_numpy(resize(im.permute(1, 2, 0).numpy()).transpose(2, 0, 1).copy()) for im in x.cpu()])
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            f = nets[mode](x.to(device))                                    # (N, 2048)
            return f.cpu().numpy(), (f @ nets[mode].base.output.weight.float().T).softmax(1).cpu().numpy()
    return extract

def fid_is(sample_batches, extract, ref_path, real_batches):
    """FID in both modes and IS of generated uint8 batches; reference statistics of the real
    images are computed once with the same extractor and cached at ref_path (one .npz per mode)."""
    out = {}
    for mode in FID_MODES:
        feats = lambda batches: [np.concatenate(a).astype(np.float64) for a in zip(*[extract(b, mode) for b in batches])]
        path = ref_path.format(mode=mode)
        if not os.path.exists(path):
            f, _ = feats(tqdm(real_batches(), desc=f'FID reference statistics ({mode})', leave=False))
            np.savez(path, mu=f.mean(0), sigma=np.cov(f, rowvar=False))
        ref = np.load(path)
        f, p = feats(sample_batches)
        out['fid_' + mode.split('_')[0]] = frechet_distance(f.mean(0), np.cov(f, rowvar=False), ref['mu'], ref['sigma'])
        if mode == 'legacy_tensorflow': out['is'] = inception_score(p)
    return out

def save_grid(x, path, nrow=8):
    from PIL import Image
    x = to_uint8(x[: nrow * nrow]).cpu()                                    # (n, C, H, W) -> (rows H, nrow W, C)
    Image.fromarray(x.reshape(-1, nrow, *x.shape[1:]).permute(0, 3, 1, 4, 2).reshape(-1, nrow * x.shape[3], x.shape[1]).numpy()).save(path)

def plot_metrics(path_jsonl, path_png):   # the FID-vs-kimg figure (mode_tv and nll for the toy)
    import matplotlib; matplotlib.use('Agg'); import matplotlib.pyplot as plt
    rows = [json.loads(l) for l in open(path_jsonl)]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for k in ('fid_legacy', 'fid_clean', 'mode_tv', 'nll'):
        if any(k in r for r in rows): ax.plot([r['kimg'] for r in rows if k in r], [r[k] for r in rows if k in r], marker='o', label=k)
    ax.set(xlabel='kimg (thousands of generator images)', yscale='log', title='one-step quality during training')
    ax.legend(); ax.grid(alpha=0.3); fig.tight_layout(); fig.savefig(path_png, dpi=120); plt.close(fig)

# === END SHARED: data and evaluation ===

# === BEGIN SHARED: run plumbing ===
# Flags, device/precision/DDP, EMA, atomic checkpoints, and fit(): the loop every method uses,
# with logging, NaN stop, evaluation, exact resume and --bench. A method hands fit() its networks,
# optimizers, a step function and a one-step sampler.

def _typed(cast, ok, what):
    def parse(s):
        try: v = cast(s)
        except ValueError: raise argparse.ArgumentTypeError(f'{s!r} is not a number')
        if not (ok(v) and math.isfinite(v)): raise argparse.ArgumentTypeError(f'{s!r} must be {what}')
        return v
    return parse
pos_int, nonneg_int = _typed(int, lambda v: v > 0, 'a positive integer'), _typed(int, lambda v: v >= 0, 'an integer >= 0')
pos_float, nonneg_float = _typed(float, lambda v: v > 0, 'a positive number'), _typed(float, lambda v: v >= 0, 'a number >= 0')

def add_shared_args(p):
    g = p.add_argument_group('run (the same in every script)')
    A = g.add_argument
    A('--data', choices=['cifar10', 'toy'], default='cifar10', help='CIFAR-10 on a GPU, or the 2-D toy world on a CPU')
    A('--teacher', help=f'EDM teacher: URL, official .pkl, our .pt, or "random" (default {EDM_UNCOND}, with --cond its cond twin; toy: the cached toy teacher)')
    A('--cond', action='store_true', help='class-conditional CIFAR-10 teacher and generator')
    A('--out', help='run directory (default runs/<script>-<data>)')
    A('--kimg', type=pos_float, help='training length, thousands of generator images')
    A('--batch', type=pos_int, help='total batch size over all GPUs')
    A('--lr', type=pos_float, help='generator learning rate (Adam)')
    A('--ema-kimg', type=nonneg_float, help='half-life of the generator EMA, kimg')
    A('--seed', type=nonneg_int, default=0, help='random seed'); A('--resume', action='store_true', help='continue from the checkpoint in --out')
    A('--eval-every', type=pos_float, help='evaluate and checkpoint every this many kimg')
    A('--log-every', type=pos_int, help='log every this many steps')
    A('--fid-samples', type=pos_int, default=10000, help='samples for FID/IS during training'); A('--fid-final', type=nonneg_int, default=50000, help='... and at the end (0: none)')
    A('--data-dir', help='folder holding CIFAR-10 (downloaded there if absent; default: the cache)')
    A('--model-channels', type=pos_int, default=128, help='SongUNet width for --teacher random')
    A('--bench', type=nonneg_int, default=0, metavar='N', help='time N training steps of the full-size network on random data and exit')
    A('--precision', choices=['auto', 'bf16', 'fp32'], default='auto', help='network arithmetic (auto: bf16 on CUDA, fp32 on a CPU); preconditioning and losses stay fp32')
    A('--compile', action='store_true', help='torch.compile the networks'); A('--device', help='cuda, cpu, ... (default: cuda if available)')

def finish_config(p, argv, defaults):
    cfg = p.parse_args(argv)
    for k, v in defaults[cfg.data].items():
        if getattr(cfg, k, None) is None: setattr(cfg, k, v)
    if cfg.data == 'toy' and cfg.cond: p.error('--cond needs --data cifar10')
    if cfg.batch % int(os.environ.get('WORLD_SIZE', 1)): p.error(f"--batch {cfg.batch} must be a multiple of the {os.environ['WORLD_SIZE']} processes")
    cfg.teacher = cfg.teacher or ('toy' if cfg.data == 'toy' else 'random' if cfg.bench else EDM_COND if cfg.cond else EDM_UNCOND)
    cfg.script = os.path.splitext(os.path.basename(p.prog))[0]
    cfg.out = cfg.out or os.path.join('runs', f'{cfg.script}-{cfg.data}')
    return cfg

class Ctx:
    """Where this process runs: device, DDP rank and world size (torchrun), bf16 autocast, seeding."""
    def __init__(self, cfg):
        self.ddp = 'RANK' in os.environ
        self.rank, self.world = (int(os.environ['RANK']), int(os.environ['WORLD_SIZE'])) if self.ddp else (0, 1)
        dev = cfg.device or ('cuda' if torch.cuda.is_available() else 'cpu')
        self.device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if dev == 'cuda' else dev)
        if self.device.type == 'cuda':                                      # TF32 for fp32 matmuls and convolutions
            torch.cuda.set_device(self.device); torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        if self.ddp and not torch.distributed.is_initialized(): torch.distributed.init_process_group('nccl' if self.device.type == 'cuda' else 'gloo')
        self.bf16, self.main = cfg.precision == 'bf16' or (cfg.precision == 'auto' and self.device.type == 'cuda'), self.rank == 0
        seed = cfg.seed * 1000 + self.rank                                   # different noise on each rank
        random.seed(seed); np.random.seed(seed); torch.manual_seed(seed)

    def autocast(self): return torch.autocast(self.device.type, torch.bfloat16) if self.bf16 else contextlib.nullcontext()

    def gather(self, obj):   # [obj of rank 0, obj of rank 1, ...]
        out = [obj] * self.world
        if self.world > 1: torch.distributed.all_gather_object(out, obj)
        return out

    def step(self, opt, loss, params):
        """backward; average the gradients over ranks (one all-reduce of a flat buffer); step."""
        opt.zero_grad(set_to_none=True); loss.backward()
        if self.world > 1:
            params = [p for p in params if p.grad is not None]                # skips, e.g., a discriminator's unused decoder
            flat = torch.cat([p.grad.flatten() for p in params]) / self.world
            torch.distributed.all_reduce(flat)
            for p, g in zip(params, flat.split([q.numel() for q in params])): p.grad = g.view_as(p)
        opt.step()

@torch.no_grad()
def ema_update(ema, net, batch, half_life_kimg):   # ema <- ema + (1 - beta) (net - ema), half-life in kimg; one fused call
    torch._foreach_lerp_(list(ema.parameters()), list(net.parameters()), 1 - 0.5 ** (batch / max(half_life_kimg * 1000, 1e-8)))

def atomic_save(obj, path):   # a crash mid-write leaves the previous file intact
    torch.save(obj, path + '.tmp'); os.replace(path + '.tmp', path)

def one_hot(n, label_dim, device, generator=None):
    return F.one_hot(torch.randint(label_dim, (n,), device=device, generator=generator), label_dim).float() if label_dim else None

class World:
    """What a run trains on: the teacher, real data (CIFAR-10 or the mixture), noise, evaluation."""
    def __init__(self, cfg, ctx, extract=None):
        self.cfg, self.ctx, self.extract, dev = cfg, ctx, extract, ctx.device
        if cfg.data == 'toy':
            self.teacher = toy_teacher().to(dev)
            self.mixture, self.shape = GaussianMixture2D(), (2,)
        else:
            with torch.random.fork_rng(devices=[]):                          # a random teacher is the same on every rank,
                torch.manual_seed(cfg.seed)                                  # and each rank's own noise stream is kept
                self.teacher = (EDMPrecond(label_dim=10 * cfg.cond, model_channels=cfg.model_channels).eval().requires_grad_(False).to(dev)
                                if cfg.teacher == 'random' else load_edm(cfg.teacher, dev))
            self.shape = (3, 32, 32)
            x, y = ((torch.randint(0, 256, (1024, 3, 32, 32), dtype=torch.uint8), torch.randint(10, (1024,))) if cfg.bench
                    else load_cifar10(cfg.data_dir or cache_dir()))
            self.images, self.labels = x.to(dev), y.to(dev)                  # held on the device: no loader
        self.label_dim = self.teacher.label_dim

    def real(self, n):
        """n real samples and one-hot labels: mixture samples, or CIFAR-10 in [-1, 1] with x-flips."""
        if self.cfg.data == 'toy': return self.mixture.sample(n).to(self.ctx.device), None
        i = torch.randint(len(self.images), (n,), device=self.ctx.device)
        x = self.images[i].float() / 127.5 - 1
        x = torch.where(torch.rand(n, 1, 1, 1, device=x.device) < 0.5, x.flip(3), x)
        return x, F.one_hot(self.labels[i], 10).float() if self.label_dim else None

    def noise(self, n): return torch.randn(n, *self.shape, device=self.ctx.device), one_hot(n, self.label_dim, self.ctx.device)

    @torch.no_grad()
    def evaluate(self, sampler, final=False):
        """Toy: exact metrics of 10k one-step samples and the scatter plot. CIFAR-10: a sample grid and
        FID/IS of --fid-samples (--fid-final at the end). Uses its own generators: training RNG untouched."""
        cfg, dev = self.cfg, self.ctx.device
        if cfg.data == 'toy':
            x = sampler(torch.randn(10000, 2, generator=torch.Generator().manual_seed(123)).to(dev), None).cpu()
            plot_toy(self.mixture, x, os.path.join(cfg.out, 'toy_samples.png'), f'{cfg.script}: one-step samples')
            if final: np.save(os.path.join(cfg.out, 'toy_samples.npy'), x.numpy())
            return self.mixture.metrics(x)
        g = torch.Generator(dev).manual_seed(123)
        save_grid(sampler(torch.randn(64, *self.shape, device=dev, generator=g), one_hot(64, self.label_dim, dev, g)), os.path.join(cfg.out, 'samples.png'))
        n = cfg.fid_final if final else cfg.fid_samples
        if not n: return {}
        self.extract = self.extract or clean_fid_extractor(dev)
        fake = [to_uint8(sampler(torch.randn(min(500, n - i), *self.shape, device=dev, generator=g), one_hot(min(500, n - i), self.label_dim, dev, g)))
                for i in tqdm(range(0, n, 500), desc=f'{n} samples for FID', leave=False)]
        return fid_is(fake, self.extract, os.path.join(cache_dir(), 'fid_ref_cifar10_{mode}.npz') if cfg.data_dir is None else
                      os.path.join(cfg.out, 'fid_ref_{mode}.npz'), lambda: self.images.split(500))

RESUMABLE = ('resume', 'kimg', 'eval_every', 'log_every', 'fid_samples', 'fid_final', 'data_dir', 'out', 'compile', 'device', 'precision')
def fit(cfg, ctx, world, nets, opts, step_fn, sampler):
    """Train until cfg.kimg. step_fn() runs one training step and returns a dict of scalar loss
    tensors; nets and opts (dicts) are checkpointed; sampler(z, c) gives one-step samples."""
    if cfg.bench: return bench(cfg, ctx, step_fn)
    os.makedirs(cfg.out, exist_ok=True)
    ckpt_path, metrics_path = os.path.join(cfg.out, 'ckpt.pt'), os.path.join(cfg.out, 'metrics.jsonl')
    state = dict(step=0, kimg=0.0, next_eval=cfg.eval_every, next_ckpt=cfg.eval_every / 5)   # checkpoints 5x per eval interval
    if cfg.resume:
        if not os.path.exists(ckpt_path): raise SystemExit(f'error: --resume: there is no checkpoint {ckpt_path}')
        ck = torch.load(ckpt_path, map_location='cpu', weights_only=False)
        if len(ck['rng']['torch']) != ctx.world: raise SystemExit(f"error: --resume: {ckpt_path} was trained on {len(ck['rng']['torch'])} processes, not {ctx.world}")
        diff = [f"--{k.replace('_', '-')} {v}" for k, v in ck['cfg'].items() if k not in RESUMABLE and not k.startswith('lr') and vars(cfg).get(k) != v]
        if diff: raise SystemExit(f"error: --resume: {ckpt_path} was trained with {', '.join(diff)}; pass the same, or choose another --out")
        lrs = {k: [g['lr'] for g in o.param_groups] for k, o in opts.items()}             # this run's learning rates win
        for group, mods in (('nets', nets), ('opts', opts)):
            for k, m in mods.items(): m.load_state_dict(ck[group][k])
        for k, o in opts.items():
            for g, lr in zip(o.param_groups, lrs[k]): g['lr'] = lr
        state, rng = ck['state'], ck['rng']
        torch.set_rng_state(rng['torch'][ctx.rank]); np.random.set_state(rng['numpy']); random.setstate(rng['python'])
        if rng['cuda'] is not None and ctx.device.type == 'cuda': torch.cuda.set_rng_state(rng['cuda'][ctx.rank])
        if ctx.main: print(f"resumed from {ckpt_path} at step {state['step']} ({state['kimg']:.1f} kimg)")
    elif os.path.exists(ckpt_path):
        raise SystemExit(f'error: {cfg.out} already holds a run; pass --resume to continue it, or choose another --out')
    elif ctx.main:
        json.dump(vars(cfg), open(os.path.join(cfg.out, 'config.json'), 'w'), indent=1, default=str)

    def checkpoint():   # everything needed to continue bit-exactly, with the RNG state of every rank
        rng = dict(torch=ctx.gather(torch.get_rng_state()), numpy=np.random.get_state(), python=random.getstate(),
                   cuda=ctx.gather(torch.cuda.get_rng_state()) if ctx.device.type == 'cuda' else None)
        if ctx.main: atomic_save(dict(nets={k: m.state_dict() for k, m in nets.items()}, opts={k: o.state_dict() for k, o in opts.items()},
                                      state=state, rng=rng, cfg=vars(cfg)), ckpt_path)

    def evaluate(final):   # one row of metrics.jsonl, the metrics-vs-kimg plot, a log line
        if not ctx.main: return
        with ctx.autocast(): row = dict(kimg=round(state['kimg'], 3), step=state['step'], **world.evaluate(sampler, final), final=final)
        with open(metrics_path, 'a') as f: f.write(json.dumps(row) + '\n')
        plot_metrics(metrics_path, os.path.join(cfg.out, 'metrics.png')); tqdm.write('eval  ' + '  '.join(f'{k} {v:.4g}' for k, v in row.items()))

    signal.signal(signal.SIGTERM, signal.default_int_handler)                # pre-emption acts like Ctrl-C
    bar = tqdm(total=cfg.kimg, initial=state['kimg'], disable=not ctx.main, bar_format='{l_bar}{bar}| {n:.1f}/{total:.0f} kimg [{elapsed}<{remaining}]')
    pending, t0 = [], time.time()
    try:
        while state['kimg'] < cfg.kimg:
            with ctx.autocast(): losses = step_fn()
            pending.append(torch.stack([v.detach().float() for v in losses.values()]))
            state['step'] += 1; state['kimg'] += cfg.batch / 1000; bar.update(min(cfg.batch / 1000, bar.total - bar.n))
            done, due, snap = state['kimg'] >= cfg.kimg, state['kimg'] >= state['next_eval'], state['kimg'] >= state['next_ckpt']
            if state['step'] % cfg.log_every == 0 or done or due or snap:         # losses are checked before any checkpoint
                vals, pending = torch.stack(pending) / ctx.world, []             # the loop's only host sync; losses are averaged
                if ctx.world > 1: torch.distributed.all_reduce(vals)             # over ranks, so a NaN on any rank stops them all
                vals = vals.cpu()
                if not torch.isfinite(vals).all():
                    r, c = (~torch.isfinite(vals)).nonzero()[0].tolist()
                    raise FloatingPointError(f"{list(losses)[c]} is {vals[r, c].item()} at step {state['step'] - len(vals) + r + 1}")
                dt, t0 = (time.time() - t0) / len(vals), time.time()
                if ctx.main: tqdm.write(f"step {state['step']:7d}  kimg {state['kimg']:9.2f}  " + '  '.join(
                    f'{k} {v:.4f}' for k, v in zip(losses, vals.mean(0).tolist())) + f'  {dt * 1000:.0f} ms/step  {cfg.batch / dt:.0f} img/s')
            if due or done:
                state['next_eval'] += cfg.eval_every
                evaluate(final=done); t0 = time.time()                          # keep eval time out of ms/step
            if due or done or snap:
                state['next_ckpt'] = state['kimg'] + cfg.eval_every / 5; checkpoint()
    except KeyboardInterrupt: raise SystemExit(f"interrupted at step {state['step']}; continue from the last checkpoint {ckpt_path} with --resume")
    except FloatingPointError as e: raise SystemExit(f"error: {e}; stopped. The last good checkpoint is {ckpt_path}"
                                                     f"{'' if os.path.exists(ckpt_path) else ' (none written yet)'}: --resume with a lower --lr or --precision fp32")
    bar.close()
    if ctx.ddp: torch.distributed.barrier()
    return dict(state, nets=nets)

PEAK_TFLOPS = {'H100': 989.0, 'H200': 989.0, 'A100': 312.0}              # dense bf16, per GPU
def bench(cfg, ctx, step_fn):
    """ms/step, img/s, peak memory, and achieved TFLOP/s (torch's FLOP counter over one step) / MFU."""
    from torch.utils.flop_counter import FlopCounterMode
    sync = torch.cuda.synchronize if ctx.device.type == 'cuda' else (lambda: None)
    with ctx.autocast(): step_fn()                                           # warm-up (and compilation)
    try:
        with FlopCounterMode(display=False) as fc, ctx.autocast(): step_fn()
        flops = fc.get_total_flops()
    except RuntimeError:                                                     # it cannot follow a double backward (R1)
        flops = float('nan'); print('bench: torch\'s FLOP counter failed on this step; TFLOP/s and MFU are unknown')
    if ctx.device.type == 'cuda': torch.cuda.reset_peak_memory_stats()
    sync(); t0 = time.time()
    for _ in range(cfg.bench):
        with ctx.autocast(): step_fn()
    sync(); dt = (time.time() - t0) / cfg.bench
    mem, name = ((torch.cuda.max_memory_allocated() / 2 ** 30, torch.cuda.get_device_name()) if ctx.device.type == 'cuda'
                 else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 'cpu'))
    tflops, peak = flops / dt / 1e12, next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    res = dict(script=cfg.script, device=name, batch=cfg.batch, precision='bf16' if ctx.bf16 else 'fp32', compile=cfg.compile,
               ms_per_step=dt * 1000, img_per_s=cfg.batch / dt, peak_mem_gib=mem, gflop_per_img=flops / (cfg.batch // ctx.world) / 1e9,
               tflops=tflops, mfu=tflops / peak if peak else float('nan'))
    if ctx.main: print('bench  ' + '  '.join(f'{k} {v:.4g}' if isinstance(v, float) else f'{k} {v}' for k, v in res.items()))
    return res

# === END SHARED: run plumbing ===

# -----------------------------------------------------------------------------
# Consistency models: parameterisation, teacher ODE step, losses, sampler. Tensors of any shape (images or points).

class Consistency(nn.Module):
    """f_theta = c_skip x + c_out F_theta, CM's coefficients (top): f(x, sigma_min) = x exactly (Eq. 8). F_theta, the raw output
    of the wrapped EDM denoiser D = c_skip^EDM x + c_out^EDM F, is F = (D - c_skip^EDM x) / c_out^EDM: any EDM-style net fits."""
    def __init__(self, net):
        super().__init__(); self.net, self.sigma_data, self.label_dim = net, net.sigma_data, net.label_dim

    def forward(self, x, sigma, class_labels=None):
        x, sigma, sd = x.float(), as_sigma(sigma, x), self.sigma_data
        F_x = (self.net(x, sigma, class_labels) - edm_precond(sigma, sd)[0] * x) / edm_precond(sigma, sd)[1]   # F_theta(c_in x, c_noise)
        return sd ** 2 / ((sigma - SIGMA_MIN) ** 2 + sd ** 2) * x + (sigma - SIGMA_MIN) * sd / (sigma ** 2 + sd ** 2).sqrt() * F_x

def heun_step(net, x, t_cur, t_next, class_labels=None):
    """One Heun step (EDM Algorithm 2, t_next > 0) of the probability-flow ODE dx/dt = (x - D(x; t)) / t."""
    t_cur, t_next = as_sigma(t_cur, x), as_sigma(t_next, x)
    d = (x - net(x, t_cur, class_labels).to(x.dtype)) / t_cur; x_next = x + (t_next - t_cur) * d   # Euler, then the trapezoid rule
    return x + (t_next - t_cur) * (d + (x_next - net(x_next, t_next, class_labels).to(x.dtype)) / t_next) / 2

def sigma_pairs(n, N, device, lognormal=False):
    """n pairs (t_{n+1}, t_n), adjacent on the N-level Karras grid: n uniform (CM) or lognormal (iCT: P_mean -1.1, P_std 2)."""
    s = karras(torch.arange(N - 1, -1, -1, dtype=torch.float64, device=device) / (N - 1))   # sigma_min = t_1 < ... < t_N = sigma_max
    cdf = torch.erf((s.log() + 1.1) / (2 * math.sqrt(2)))                              # built on the device: no host sync
    i = torch.multinomial(cdf[1:] - cdf[:-1] if lognormal else torch.ones(N - 1, device=device), n, replacement=True)
    return s[i + 1].float(), s[i].float()

# iCT's curriculum: N = min(s0 2^floor(k / K'), s1) + 1 levels at step k, K' = floor(total / (log2(s1 / s0) + 1))
def ct_scales(k, total, s0=10, s1=1280): return min(s0 * 2 ** (k // max(total // (max(int(math.log2(s1 / s0)), 0) + 1), 1)), s1) + 1

def distance(a, b, huber_c=None):
    """Per-sample d(a, b): squared L2, or pseudo-Huber sqrt(||a - b||^2 + c^2) - c, Eq. (43)."""
    d2 = (a - b).pow(2).flatten(1).sum(1)
    return d2 if huber_c is None else (d2 + huber_c ** 2).sqrt() - huber_c        # Eq. (43), seed 003

def cd_loss(G, G_target, teacher, x0, t_hi, t_lo, class_labels=None, huber_c=None):
    """CD, Eq. (12): x = x0 + t_{n+1} z, E w d(f_theta(x, t_{n+1}), sg f_theta-(heun_step(teacher, x, t_{n+1}, t_n), t_n))."""
    x = x0 + as_sigma(t_hi, x0) * torch.randn_like(x0)
    with torch.no_grad(): target = G_target(heun_step(teacher, x, t_hi, t_lo, class_labels), t_lo, class_labels)
    return (distance(G(x, t_hi, class_labels), target, huber_c) / (t_hi - t_lo)).mean()      # Eq. (12), w = 1/(t_{n+1} - t_n)

def ct_loss(G, x0, t_hi, t_lo, class_labels=None, huber_c=None):
    """CT, Eq. (27), theta- = sg(theta): x_{t_n} = x0 + t_n z shares z with x_{t_{n+1}} (Eq. 20: no teacher, Eq. 17-19)."""
    z = torch.randn_like(x0)
    with torch.no_grad(): target = G(x0 + as_sigma(t_lo, x0) * z, t_lo, class_labels)
    return (distance(G(x0 + as_sigma(t_hi, x0) * z, t_hi, class_labels), target, huber_c) / (t_hi - t_lo)).mean()   # Eq. (21), (27)

@torch.no_grad()
def multistep(G, z, c=None, steps=1, mid_sigma=0.821, generator=None):
    """x = f(s_max z, s_max); x <- f(x + sqrt(tau^2 - s_min^2) n, tau), tau: mid_sigma, then a Karras ramp toward s_min."""
    x, a, b = generate(G, z, c), mid_sigma ** (1 / RHO), SIGMA_MIN ** (1 / RHO)
    for tau in [(a + k / (steps - 1) * (b - a)) ** RHO for k in range(steps - 1)]:
        x = G(x + math.sqrt(tau ** 2 - SIGMA_MIN ** 2) * torch.randn(x.shape, device=x.device, generator=generator), tau, c)
    return x

# -----------------------------------------------------------------------------
# Training: CD (Eq. 12: teacher Heun step, target theta-) or CT (Eq. 27, theta- = theta, iCT's N curriculum).

def train(cfg, extract=None):
    ctx = Ctx(cfg)
    world = World(cfg, ctx, extract)
    G = Consistency(copy.deepcopy(world.teacher).requires_grad_(True))          # f_theta starts from the teacher (eval mode: no dropout)
    G_ema = copy.deepcopy(G).eval().requires_grad_(False)
    G_target = copy.deepcopy(G_ema) if cfg.mode == 'cd' and cfg.mu > 0 else G      # theta-: an EMA of rate mu, or sg(theta)
    opt_G = torch.optim.Adam(G.parameters(), lr=cfg.lr, fused=ctx.device.type == 'cuda')
    huber_c = None if cfg.loss == 'l2' else cfg.huber_c or 0.00054 * math.sqrt(math.prod(world.shape))
    G_c, teacher_c, target_c = [torch.compile(m) if cfg.compile else m for m in (G, world.teacher, G_target)]
    B, total, k = cfg.batch // ctx.world, math.ceil(cfg.kimg * 1000 / cfg.batch), []   # per-rank batch, steps, CT step count
    g = torch.Generator(ctx.device).manual_seed(cfg.seed); sampler = lambda z, c: multistep(G_ema, z, c, cfg.sample_steps, cfg.mid_sigma, g)
    if cfg.eval_only:                                                               # e.g. the 2-step metrics of a 1-step run
        if not os.path.exists(path := os.path.join(cfg.out, 'ckpt.pt')): raise SystemExit(f'error: --eval-only: there is no checkpoint {path}')
        G_ema.load_state_dict(torch.load(path, map_location='cpu', weights_only=False)['nets']['G_ema'])
        cfg.out = os.path.join(cfg.out, f'eval_{cfg.sample_steps}step'); os.makedirs(cfg.out, exist_ok=True)   # beside the run's own samples
        with ctx.autocast(): return print(json.dumps(dict(sample_steps=cfg.sample_steps, **world.evaluate(sampler, final=True))))
    def step():
        x0, c = world.real(B)                                                       # both modes draw x0 ~ p_data
        if cfg.mode == 'cd':                                                        # n uniform on the --scales grid
            losses = dict(loss_cd=cd_loss(G_c, target_c, teacher_c, x0, *sigma_pairs(B, cfg.scales, ctx.device), c, huber_c))
        else:
            if not k: k.append(int(next(iter(opt_G.state.values()))['step']) if opt_G.state else 0)  # Adam's count survives --resume
            t_hi, t_lo = sigma_pairs(B, ct_scales(k[0], total, *cfg.ct_scales), ctx.device, cfg.ct_noise == 'lognormal')
            losses = dict(loss_ct=ct_loss(G_c, x0, t_hi, t_lo, c, huber_c)); k[0] += 1
        ctx.step(opt_G, *losses.values(), list(G.parameters()))
        if G_target is not G:                                                       # theta- <- mu theta- + (1 - mu) theta
            with torch.no_grad(): torch._foreach_lerp_(list(G_target.parameters()), list(G.parameters()), 1 - cfg.mu)
        ema_update(G_ema, G, cfg.batch, cfg.ema_kimg)
        return losses

    return fit(cfg, ctx, world, dict(G=G, G_ema=G_ema, **({'G_target': G_target} if G_target is not G else {})), dict(G=opt_G), step, sampler)

def main(argv=None): train(get_config(argv))

if __name__ == '__main__':
    main()
